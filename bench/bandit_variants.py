"""Screening estimator and exploration variants of the Diag-LinUCB family before changing it.

``bench/bandit.py`` compares exploration rules that share one estimator (the Diag-LinUCB
statistics on top-K cluster contexts). A change to that estimator moves greedy and ε-greedy too,
so a variant is only worth adopting if Diag-LinUCB gains *relative to* ε-greedy on the same
estimator, or gains absolutely in every environment. This script answers that cheaply on
*screening seeds* (default 1 and 5; never the evaluation seeds 2, 3, 4): per variant and
environment it runs greedy, tunes ε-greedy's ε and Diag-LinUCB's α over ``bench.bandit.GRIDS``
on those seeds (the same grid size for both, both tuned on the seeds they are scored on, so the
ratio is optimistic for neither), and reports regret per round and Diag ÷ ε-greedy.

The statistics here are dense arrays (item index × cluster), not :class:`DiagLinUCB`: a variant
is a few lines instead of a change to the shipped class. With ``estimator="diagonal"``, no prior
and the UCB rule it is the shipped algorithm and reproduces ``bench/bandit.py``'s greedy and
Diag-LinUCB regret exactly on the same seed (clustered, seed 2, 10,000 rounds: 0.0843, 0.1034).

Variants (``VARIANTS``):

* estimator ``diagonal`` (shipped: ``d += w²``) or ``row_sum`` (``d += w·Σw``: ``b/d`` is the
  w-weighted mean reward, calibrated; its difference to ``Σ w wᵀ`` is a graph Laplacian, so its
  bonus never exceeds full LinUCB's);
* prior mean of a cell (with ``row_sum``; strength ``tau`` pseudo-observations): 0 (shipped),
  ``item`` (the item's pooled mean over all clusters, itself shrunk to the population mean),
  ``cluster`` (the cluster's mean over all items), ``hierarchical`` (``item`` plus the pooled
  mean's own variance in the bonus, so a cell of a well-known item explores less);
* rule ``ucb`` (mean + α·bonus) or ``thompson`` (mean + α·bonus·z, z ~ N(0, 1) per candidate);
* top-K of the context (``k``).

Run: ``.venv/bin/python bench/bandit_variants.py --variants shipped,row_sum`` →
``bench/results/bandit_variants.json`` (merged per variant, so variants can be run one at a time).
``--oracle clustered:10000:2,...`` records, for the shipped variant on the given seeds, the best
Diag ÷ ε-greedy any knob of the grids reaches: how far tuning alone could go.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bandit as bench
from freshrec.runtime import apply_thread_budget

VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "shipped_thompson": {"rules": ("ucb", "thompson")},
    "row_sum": {"estimator": "row_sum", "rules": ("ucb", "thompson")},
    "row_sum_k4": {"estimator": "row_sum", "k": 4},
    "item_prior": {"estimator": "row_sum", "prior": "item", "tau": 1.0},
    "cluster_prior": {"estimator": "row_sum", "prior": "cluster", "tau": 1.0},
    "cluster_prior_k4": {"estimator": "row_sum", "prior": "cluster", "tau": 1.0, "k": 4},
    "hierarchical_tau1": {"estimator": "row_sum", "prior": "hierarchical", "tau": 1.0},
    "hierarchical_tau4": {"estimator": "row_sum", "prior": "hierarchical", "tau": 4.0},
    "hierarchical_tau16": {"estimator": "row_sum", "prior": "hierarchical", "tau": 16.0},
}


class DenseDiag(bench.Policy):
    """Greedy / ε-greedy / UCB / Thompson on dense Diag statistics of one variant."""

    def __init__(self, s: bench.Stream, seed: int, half_life: float, rule: str, knob: float,
                 estimator: str = "diagonal", prior: str | None = None, tau: float = 1.0,
                 k: int = bench.TOP_K) -> None:
        rng = np.random.default_rng(seed)
        shipped_k, bench.TOP_K = bench.TOP_K, k
        try:
            self.cl, self.w, n = bench.cluster_contexts(s, int(rng.integers(1 << 30)))
        finally:
            bench.TOP_K = shipped_k
        n_items = int(s.items.max()) + 1
        self.d = np.zeros((n_items, n))  # data part only: λ (or τ) is added when scoring
        self.b = np.zeros((n_items, n))
        self.rng, self.half_life, self.last = rng, half_life, 0.0
        self.rule, self.knob = rule, knob
        self.estimator, self.prior, self.tau = estimator, prior, tau

    def _decay(self, t: float) -> None:
        # One global age per batch is the lazy per-row decay of DiagLinUCB, since every row is
        # scored at the same time.
        if self.half_life:
            f = 2.0 ** (-(t - self.last) / self.half_life)
            self.d *= f
            self.b *= f
        self.last = t

    def scores(self, users: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cl, w = self.cl[users], self.w[users][:, None, :]  # (B, K), (B, 1, K)
        dc = self.d[cands[:, :, None], cl[:, None, :]]  # (B, m, K)
        bc = self.b[cands[:, :, None], cl[:, None, :]]
        if self.prior is None:
            den = bench.LAM + dc
            return (w * bc / den).sum(-1), np.sqrt((w * w / den).sum(-1))
        tau, den = self.tau, self.tau + dc
        if self.prior == "cluster":
            cm = self.b.sum(0) / np.maximum(self.d.sum(0), 1e-12)
            m0 = cm[cl][:, None, :]
            return (w * (bc + tau * m0) / den).sum(-1), np.sqrt((w * w / den).sum(-1))
        pop = self.b.sum() / max(self.d.sum(), 1e-12)
        n0, b0 = self.d[cands].sum(-1), self.b[cands].sum(-1)  # the item's pooled events
        m0 = ((b0 + pop) / (n0 + 1.0))[:, :, None]
        mean = (w * (bc + tau * m0) / den).sum(-1)
        var = (w * w / den).sum(-1)
        if self.prior == "hierarchical":
            var = var + (w * tau / den).sum(-1) ** 2 / (n0 + 1.0)
        return mean, np.sqrt(var)

    def choose(self, t, users, cands):
        self._decay(float(t))
        mean, bonus = self.scores(users, cands)
        tie = 1e-9 * self.rng.random(mean.shape)
        if self.rule == "ucb":
            s = mean + self.knob * bonus
        elif self.rule == "thompson":
            s = mean + self.knob * bonus * self.rng.standard_normal(mean.shape)
        else:
            s = mean
        a = np.argmax(s + tie, 1)
        if self.rule == "eps_greedy":
            r = self.rng.random(len(users)) < self.knob
            a = np.where(r, self.rng.integers(0, cands.shape[1], len(users)), a)
        return a

    def learn(self, t, users, items, rewards, probs):
        cl, w = self.cl[users], self.w[users]
        dw = w * w if self.estimator == "diagonal" else w * w.sum(1, keepdims=True)
        np.add.at(self.d, (items[:, None], cl), dw)
        np.add.at(self.b, (items[:, None], cl), w * rewards[:, None])


_STREAMS: dict[tuple[str, int, int], bench.Stream] = {}


def regret(env: str, T: int, seed: int, ml_path: str | None, rule: str, knob: float,
           **variant: Any) -> float:
    """Regret per round of one policy on one stream (the stream drawn as bench/bandit.py does)."""
    key = (env, T, seed)
    if key not in _STREAMS:
        _STREAMS[key] = bench.make_stream(env, T, seed, ml_path)
    s = _STREAMS[key]
    half_life = T / 4 if env == "dynamic" else 0.0
    pol = DenseDiag(s, seed + 17, half_life, rule, knob, **variant)
    total = sum(float(bench.play_batch(pol, s, start)[1].sum())
                for start in range(0, T, bench.BATCH))
    return total / T


def screen(variant: dict[str, Any], envs: list[str], seeds: list[int], T: int,
           ml_path: str | None) -> dict[str, Any]:
    """Greedy, tuned ε-greedy and tuned Diag-LinUCB (each rule) of one variant, per environment."""
    variant = dict(variant)
    rules = variant.pop("rules", ("ucb",))
    out: dict[str, Any] = {}
    for env in envs:
        def mean_regret(rule: str, knob: float, env: str = env) -> float:
            return float(np.mean([regret(env, T, sd, ml_path, rule, knob, **variant)
                                  for sd in seeds]))

        eps = {v: mean_regret("eps_greedy", v) for v in bench.GRIDS["eps_greedy"][1]}
        best_eps = min(eps, key=eps.__getitem__)
        res: dict[str, Any] = {"greedy": mean_regret("greedy", 0.0),
                               "eps_greedy": {"epsilon": best_eps, "regret": eps[best_eps]}}
        for rule in rules:
            sc = {v: mean_regret(rule, v) for v in bench.GRIDS["diag_linucb"][1]}
            best = min(sc, key=sc.__getitem__)
            res[rule] = {"alpha": best, "regret": sc[best],
                         "ratio_vs_eps_greedy": sc[best] / eps[best_eps]}
        out[env] = res
        print(env, json.dumps(res), flush=True)
    return out


def oracle(env: str, T: int, seed: int, ml_path: str | None) -> dict[str, Any]:
    """Shipped variant, every knob of the grids on one *evaluation* seed: the best ratio any
    tuning could reach there. A ceiling for diagnosis, never a way to choose a knob."""
    eps = {v: regret(env, T, seed, ml_path, "eps_greedy", v) for v in bench.GRIDS["eps_greedy"][1]}
    diag = {v: regret(env, T, seed, ml_path, "ucb", v) for v in bench.GRIDS["diag_linucb"][1]}
    return {"env": env, "rounds": T, "seed": seed,
            "greedy": regret(env, T, seed, ml_path, "greedy", 0.0),
            "eps_greedy": {str(k): v for k, v in eps.items()},
            "diag_linucb": {str(k): v for k, v in diag.items()},
            "best_ratio_vs_eps_greedy": min(diag.values()) / min(eps.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--envs", default="clustered,dynamic,movielens")
    ap.add_argument("--seeds", default="1,5", help="screening seeds (not 2, 3, 4)")
    ap.add_argument("--rounds", type=int, default=10_000)
    ap.add_argument("--movielens", default=None)
    ap.add_argument("--oracle", help="ENV:ROUNDS:SEED,...: the shipped variant's best ratio over "
                    "the whole grids on those seeds (diagnosis only; evaluation seeds allowed)")
    args = ap.parse_args()
    apply_thread_budget(1)
    path = bench.RESULTS / "bandit_variants.json"
    if args.oracle:
        ml = bench.movielens_dir(args.movielens)
        found = []
        for spec in args.oracle.split(","):
            env, rounds, seed = spec.split(":")
            found.append(oracle(env, int(rounds), int(seed), ml))
            print(json.dumps(found[-1]), flush=True)
        results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
        results["oracle"] = found
        path.write_text(json.dumps(results, indent=2) + "\n")
        return
    seeds = [int(x) for x in args.seeds.split(",")]
    if set(seeds) & {2, 3, 4}:
        raise SystemExit("screening seeds must not be evaluation seeds (2, 3, 4)")
    envs = args.envs.split(",")
    ml_path = bench.movielens_dir(args.movielens) if "movielens" in envs else None
    if ml_path is None and "movielens" in envs:
        envs.remove("movielens")
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        print(f"== {name}: {VARIANTS[name]}", flush=True)
        res = screen(VARIANTS[name], envs, seeds, args.rounds, ml_path)
        # Re-read just before writing: several invocations may screen variants side by side.
        results = json.loads(path.read_text()) if path.exists() else {"variants": {}}
        results.update(rounds=args.rounds, grids={p: bench.GRIDS[p][1] for p in
                                                  ("eps_greedy", "diag_linucb")})
        entry = results["variants"].setdefault(name, {"environments": {}})
        entry.update(spec=VARIANTS[name], seeds=seeds, seconds=time.perf_counter() - t0)
        entry["environments"].update(res)
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
