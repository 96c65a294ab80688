"""Where the exploration benchmark's regret comes from: model error vs the cost of exploring.

``bench/bandit.py`` compares exploration rules that share one estimator (the Diag-LinUCB
statistics on top-K cluster contexts). This script splits each of their regrets, on the same
streams (same seeds, common random numbers) and with the knobs ``bench/bandit.py`` tuned:

* **model floor** — greedy on statistics fed *every* candidate's *expected* reward each batch
  (full information, no noise): what the model class itself loses, with nothing left to explore;
* **explore rounds** — the regret of rounds where the exploration rule changed the choice
  (ε-greedy's random rounds; Diag-LinUCB rounds where ranking by ``mean`` alone would have picked
  another item: the service's ``explored`` flag);
* **exploit rounds** — the regret of the other rounds: the model's error under bandit feedback.

The question it answers: with one shared model, how far below ε-greedy can *any* exploration
rule get? A policy cannot beat the model floor, so ``floor ÷ ε-greedy`` is a lower bound on the
reachable ratio, and ε-greedy's explore share is the most an exploration rule could save on it.

Run: ``.venv/bin/python bench/bandit_profile.py --quick`` → ``bench/results/bandit_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bandit as bench
from freshrec.runtime import apply_thread_budget, cpu_budget


class ProfiledDiag(bench.DiagPolicy):
    """:class:`bench.bandit.DiagPolicy` that records, per round, whether it explored."""

    def __init__(self, *args: Any, full_information: bool = False, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.full_information = full_information
        self.explored: list[bool] = []
        self.stream: bench.Stream | None = None

    def choose(self, t, users, cands):
        out = np.empty(len(users), dtype=np.int64)
        for i, u in enumerate(users):
            if self.epsilon and self.rng.random() < self.epsilon:
                out[i] = self.rng.integers(cands.shape[1])
                self.explored.append(True)
                continue
            mean, bonus = self.model.score(cands[i], self.cl[u], self.w[u], now=float(t))
            tie = 1e-9 * self.rng.random(len(mean))
            out[i] = int(np.argmax(mean + self.alpha * bonus + tie))
            self.explored.append(bool(self.alpha) and out[i] != int(np.argmax(mean + tie)))
        return out

    def learn(self, t, users, items, rewards, probs):
        if not self.full_information:
            super().learn(t, users, items, rewards, probs)
            return
        s = self.stream
        sl = slice(t, t + len(users))
        c, p = s.cands[sl], s.p[sl]
        n, m = c.shape
        self.model.update(c.ravel(), np.repeat(self.cl[users], m, 0),
                          np.repeat(self.w[users], m, 0), p.ravel(), np.full(n * m, float(t)))


def profile_run(job: dict[str, Any]) -> dict[str, Any]:
    """One Diag-family policy on one stream; regret split by explored / exploited rounds."""
    s = bench.make_stream(job["env"], job["T"], job["seed"], job["ml_path"])
    half_life = job["T"] / 4 if job["env"] == "dynamic" else 0.0
    rng = np.random.default_rng(job["seed"] + 17)  # as bench.bandit.make_policy seeds it
    alpha = job["param"] if job["policy"] == "diag_linucb" else 0.0
    eps = job["param"] if job["policy"] == "eps_greedy" else 0.0
    pol = ProfiledDiag(s, rng, float(alpha or 0.0), float(eps or 0.0), half_life,
                       full_information=job["policy"] == "full_info_greedy")
    pol.stream = s
    T = len(s.users)
    regret = np.zeros(T)
    t0 = time.perf_counter()
    for start in range(0, T, bench.BATCH):
        sl, regret[sl], _ = bench.play_batch(pol, s, start)
    ex = np.asarray(pol.explored, dtype=bool)
    return {**job, "seconds": time.perf_counter() - t0,
            "regret_per_round": float(regret.mean()),
            "explore_share": float(ex.mean()),
            "explore_regret_per_round": float(regret[ex].sum() / T),
            "exploit_regret_per_round": float(regret[~ex].sum() / T),
            "second_half_regret_per_round": float(regret[T // 2:].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick mode's horizon and seed")
    ap.add_argument("--movielens", default=None,
                    help="MovieLens-100K directory; default: the cached copy, fetched on first use")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--envs", default="clustered,dynamic,movielens")
    ap.add_argument("--seeds", help="comma-separated seeds (default: the mode's evaluation seeds)")
    args = ap.parse_args()
    apply_thread_budget(max(1, cpu_budget() // args.workers))
    name = "bandit_quick" if args.quick else "bandit"
    tuned = json.loads((bench.RESULTS / f"{name}.json").read_text())
    T = tuned["shared"]["horizon"]
    seeds = ([int(x) for x in args.seeds.split(",")] if args.seeds
             else tuned["shared"]["evaluation_seeds"])
    envs = [e for e in args.envs.split(",") if e in tuned["environments"]]
    ml_path = bench.movielens_dir(args.movielens) if "movielens" in envs else None
    if ml_path is None and "movielens" in envs:
        envs.remove("movielens")
    jobs = [{"env": e, "policy": p, "T": T, "seed": sd, "ml_path": ml_path,
             "param": tuned["environments"][e]["params"].get(p)}
            for e in envs for sd in seeds
            for p in ("full_info_greedy", "greedy", "eps_greedy", "diag_linucb")]
    with ProcessPoolExecutor(args.workers) as ex:
        runs = list(ex.map(profile_run, jobs))
    out: dict[str, Any] = {"mode": tuned["mode"], "horizon": T, "seeds": seeds,
                           "tuned_from": f"bench/results/{name}.json", "environments": {}}
    for e in envs:
        env_tuned = tuned["environments"][e]
        rand = float(np.mean([env_tuned["per_seed"][str(sd)]["regret_per_round"]["random"]
                              for sd in seeds if str(sd) in env_tuned["per_seed"]] or [np.nan]))
        pols = {}
        for p in ("full_info_greedy", "greedy", "eps_greedy", "diag_linucb"):
            rs = [r for r in runs if r["env"] == e and r["policy"] == p]
            pols[p] = {k: float(np.mean([r[k] for r in rs]))
                       for k in ("regret_per_round", "explore_share", "explore_regret_per_round",
                                 "exploit_regret_per_round", "second_half_regret_per_round")}
            pols[p]["param"] = rs[0]["param"]
        eps = pols["eps_greedy"]["regret_per_round"]
        out["environments"][e] = {
            "random_regret_per_round": rand, "policies": pols,
            "floor_over_eps_greedy": pols["full_info_greedy"]["regret_per_round"] / eps,
            "diag_over_eps_greedy": pols["diag_linucb"]["regret_per_round"] / eps,
            "eps_greedy_explore_share_of_regret": pols["eps_greedy"]["explore_regret_per_round"]
            / eps,
        }
        print(f"{e:10} " + "  ".join(
            f"{p} {v['regret_per_round']:.4f} (explore {v['explore_regret_per_round']:.4f}, "
            f"exploit {v['exploit_regret_per_round']:.4f})" for p, v in pols.items()))
        o = out["environments"][e]
        print(f"{e:10} floor ÷ ε-greedy {o['floor_over_eps_greedy']:.2f}, Diag ÷ ε-greedy "
              f"{o['diag_over_eps_greedy']:.2f}, ε-greedy's explore share of its regret "
              f"{o['eps_greedy_explore_share_of_regret']:.2f}")
    suffix = "_quick" if args.quick else ""
    (bench.RESULTS / f"bandit_profile{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
