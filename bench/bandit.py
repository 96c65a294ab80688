"""Exploration benchmark: Diag-LinUCB against random, greedy, ε-greedy, LinUCB and Vowpal Wabbit.

Three environments, one run:

* ``clustered`` — users are noisy copies of a few latent cluster centres; click probability is
  ``sigmoid(a + s·<user, item>)``; each round shows one user ``m`` random candidates.
* ``dynamic``  — the same, plus items arriving (and the oldest retiring) every ``arrive_every``
  rounds, a share of them built to be the best item for one user cluster, and item vectors
  drifting as a random walk.
* ``movielens`` — semi-synthetic MovieLens-100K: ratings ordered by time; the first half trains a
  truncated-SVD factorisation. A user's vector is the *user tower* of the MovieLens model config:
  its user-ID factor (zeros for users absent from the first half: cold users) concatenated with
  one vector per profile slot (age bucket, gender, occupation, zip prefix; a value's vector is the
  mean first-half factor of its warm holders), so cold users are placed by their profile. Rounds
  draw a user from the second half, candidates = up to ``m`` items that user rated in the second
  half, reward = rating >= 4 (deterministic).

Every policy sees the same stream (same users, candidates and reward noise: common random
numbers), picks one candidate per round, and learns in batches of ``batch`` rounds — the delay an
online system has anyway, and the same for all. Regret per round is ``max_j p_j - p_chosen`` with
the true click probabilities.

Protocol: every tunable policy has one knob with a 6-value grid, tuned on tuning seeds (mean
regret over them) that are never evaluation seeds; each policy then runs once per evaluation
seed with its tuned knob. Ratios are per seed (paired by common random numbers) and reported as
mean ± 95 % Student-t interval over evaluation seeds. Tuning: seed 1 at 5,000 rounds. ``--quick``:
10,000 rounds, one evaluation seed (2). Full: 40,000 rounds, three evaluation seeds (2, 3, 4).

Greedy, ε-greedy and Diag-LinUCB share one estimator (the Diag-LinUCB statistics on top-K cluster
contexts; ``mean`` plays the role of pCTR), so they differ only in how they explore. LinUCB
(MABWiser, disjoint, one model per item) sees the raw user vector; VW ``cb_explore_adf``
(SquareCB, ε-greedy, RegCB-opt) sees the user vector and the cluster context as shared features
with item-id interactions (``-q UA -q CA``): each peer gets at least the information Diag-LinUCB
gets.

Run: ``.venv/bin/python bench/bandit.py --quick`` (``--movielens DIR`` for a local copy; else
the cached one, fetched on first use).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bandit.clusters import OnlineKMeans
from bandit.context import context_for
from bandit.diag_linucb import DiagLinUCB
from freshrec.runtime import apply_thread_budget, cpu_budget

RESULTS = Path(__file__).resolve().parent / "results"
def movielens_dir(given: str | None) -> str | None:
    """The RecBole ml-100k directory: ``given`` (any layout ``freshrec.data`` reads), else the
    cached copy, fetched on first use; None (with a note) when it cannot be had."""
    from freshrec.data import DataError, fetch_movielens

    try:
        return str(fetch_movielens(Path(given) if given else None))
    except DataError as exc:
        print(f"note: MovieLens-100K unavailable ({exc}): skipping the MovieLens environment")
        return None

# Shared knobs (identical for every policy).
M_CANDIDATES = 20
BATCH = 10
N_CLUSTERS = 16  # learned clusters of user vectors (Diag-LinUCB context coordinates)
TOP_K = 2
LAM = 1.0

# Tuning grids: the same number of values for every tunable policy, one step of the same
# spacing beyond each end of the range where tuning-seed optima were found, so that no policy's
# optimum sits on an edge (with un-cut tuning runs SquareCB, ε-greedy, VW ε-greedy and
# Diag-LinUCB had landed on an edge of the earlier 4-value grids).
GRIDS: dict[str, tuple[str, list[float]]] = {
    "eps_greedy": ("epsilon", [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]),
    "diag_linucb": ("alpha", [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]),
    "linucb": ("alpha", [0.015, 0.05, 0.15, 0.5, 1.5, 5.0]),
    "vw_squarecb": ("gamma_scale", [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]),
    "vw_epsilon": ("epsilon", [0.01, 0.02, 0.05, 0.1, 0.2, 0.4]),
    "vw_regcb": ("mellowness", [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0]),
}
POLICIES = ["random", "greedy", "eps_greedy", "diag_linucb", "linucb", "vw_squarecb", "vw_epsilon",
            "vw_regcb"]


# ---------------------------------------------------------------------------- environments
@dataclass
class Stream:
    """A pre-drawn bandit stream; every policy replays it."""

    name: str
    user_vecs: np.ndarray  # float32 (n_users, dim): what policies see (zeros = no embedding)
    users: np.ndarray  # int (T,)
    cands: np.ndarray  # int64 (T, m) item ids
    p: np.ndarray  # float (T, m) true expected reward
    u: np.ndarray  # float (T, m) uniform noise: reward = u < p
    items: np.ndarray  # every item id that ever appears (arms for MABWiser)
    arrivals: dict[int, int] = field(default_factory=dict)  # good new item -> arrival round
    notes: str = ""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _clustered_users(rng: np.random.Generator, n_users: int, dim: int, n_true: int):
    centres = rng.normal(size=(n_true, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, n_true, n_users)
    U = centres[lab] + 0.25 * rng.normal(size=(n_users, dim)) / np.sqrt(dim)
    return U / np.linalg.norm(U, axis=1, keepdims=True), centres


def make_clustered(T: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    dim, n_items = 16, 100
    U, _ = _clustered_users(rng, 1000, dim, 8)
    V = rng.normal(size=(n_items, dim))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    users = rng.integers(0, len(U), T)
    cands = np.stack([rng.choice(n_items, M_CANDIDATES, replace=False) for _ in range(T)])
    p = _sigmoid(-2.5 + 3.0 * np.einsum("td,tmd->tm", U[users], V[cands]))
    return Stream("clustered", U.astype(np.float32), users, cands.astype(np.int64), p,
                  rng.random(p.shape), np.arange(n_items, dtype=np.int64))


def make_dynamic(T: int, seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    dim, n_live, arrive_every, n_new = 16, 80, 500, 4
    U, centres = _clustered_users(rng, 1000, dim, 8)
    n_total = n_live + n_new * (T // arrive_every + 1)
    V = rng.normal(size=(n_total, dim))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    born = np.zeros(n_total, dtype=np.int64)
    born[n_live:] = arrive_every * (1 + np.arange(n_total - n_live) // n_new)
    good = np.zeros(n_total, dtype=bool)
    for j in range(n_live, n_total, 2):  # half of the newcomers target one cluster strongly
        V[j] = 1.2 * centres[rng.integers(len(centres))] + 0.2 * V[j]
        good[j] = True
    users = rng.integers(0, len(U), T)
    cands = np.empty((T, M_CANDIDATES), dtype=np.int64)
    p = np.empty((T, M_CANDIDATES))
    drift = 0.02  # random-walk step per arrival period (preferences drift)
    Vt = V.copy()
    for t0 in range(0, T, arrive_every):
        hi = n_live + n_new * (t0 // arrive_every)
        live = np.arange(max(0, hi - n_live), hi)
        for t in range(t0, min(T, t0 + arrive_every)):
            c = rng.choice(live, M_CANDIDATES, replace=False)
            cands[t] = c
            p[t] = _sigmoid(-2.5 + 3.0 * Vt[c] @ U[users[t]])
        Vt += drift * rng.normal(size=Vt.shape)
    arrivals = {int(j): int(born[j]) for j in np.flatnonzero(good) if born[j] < T}
    return Stream("dynamic", U.astype(np.float32), users, cands, p, rng.random(p.shape),
                  np.arange(n_total, dtype=np.int64), arrivals)


# The MovieLens model config's user-side slots (freshrec/configs/movielens.toml), in order: the
# user-ID slot (16-d) then one 8-d slot per profile feature. A user's vector is the concatenation
# of its slot vectors: the pooled user tower the CTR model sees, zeros where a slot has no row.
AGE_BOUNDARIES = [18, 25, 35, 45, 50, 56]
ML_PROFILE_SLOTS = ("age", "gender", "occupation", "zip")
ML_ID_DIM, ML_SLOT_DIM, ML_ZIP_MIN_COUNT = 16, 8, 2


def _profile_values(path: Path) -> dict[int, tuple[str, ...]]:
    """user id -> (age bucket, gender, occupation, zip prefix), as the featurizer sees them."""
    out = {}
    for line in (path / "ml-100k.user").read_text().splitlines()[1:]:
        uid, age, gender, occupation, zipcode = line.split("\t")[:5]
        bucket = int(np.searchsorted(AGE_BOUNDARIES, float(age), side="right"))
        out[int(uid)] = (f"a{bucket}", gender, occupation, zipcode[:2])
    return out


@lru_cache(maxsize=2)
def _movielens(path: str):
    rows = np.loadtxt(Path(path) / "ml-100k.inter", skiprows=1, dtype=np.float64)
    rows = rows[np.argsort(rows[:, 3], kind="stable")]
    user, item = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
    liked = (rows[:, 2] >= 4).astype(np.float64)
    half = len(rows) // 2
    n_u, n_i = user.max() + 1, item.max() + 1
    R = np.zeros((n_u, n_i))
    R[user[:half], item[:half]] = liked[:half]
    Uf, s, _ = np.linalg.svd(R, full_matrices=False)
    id_vecs = (Uf[:, :ML_ID_DIM] * np.sqrt(s[:ML_ID_DIM])).astype(np.float32)
    seen = np.zeros(n_u, dtype=bool)
    seen[user[:half]] = True
    id_vecs[~seen] = 0.0  # users not in the first half have no user-ID row
    # Profile slots: a value's vector is the mean first-half factor of the warm users holding it
    # (what a model trained on the first half would have learned for it, in ML_SLOT_DIM dims);
    # values with fewer than min_count warm holders have no row (zeros), like the zip slot.
    profiles = _profile_values(Path(path))
    vecs = np.zeros((n_u, ML_ID_DIM + ML_SLOT_DIM * len(ML_PROFILE_SLOTS)), dtype=np.float32)
    vecs[:, :ML_ID_DIM] = id_vecs
    for k, _slot in enumerate(ML_PROFILE_SLOTS):
        col = slice(ML_ID_DIM + k * ML_SLOT_DIM, ML_ID_DIM + (k + 1) * ML_SLOT_DIM)
        holders: dict[str, list[int]] = {}
        for uid, vals in profiles.items():
            if uid < n_u and seen[uid]:
                holders.setdefault(vals[k], []).append(uid)
        table = {v: id_vecs[us, :ML_SLOT_DIM].mean(0) for v, us in holders.items()
                 if len(us) >= (ML_ZIP_MIN_COUNT if _slot == "zip" else 1)}
        for uid, vals in profiles.items():
            if uid < n_u and vals[k] in table:
                vecs[uid, col] = table[vals[k]]
    later: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for uid in np.unique(user[half:]):
        sel = np.flatnonzero(user[half:] == uid) + half
        if len(sel) >= 10:
            later[int(uid)] = (item[sel], liked[sel])
    return vecs, later, seen


def make_movielens(T: int, seed: int, path: str) -> Stream:
    vecs, later, seen = _movielens(path)
    rng = np.random.default_rng(seed)
    uids = np.array(sorted(later))
    users = rng.choice(uids, T)
    cands = np.empty((T, M_CANDIDATES), dtype=np.int64)
    p = np.zeros((T, M_CANDIDATES))
    for t, uid in enumerate(users):
        its, lk = later[int(uid)]
        k = min(M_CANDIDATES, len(its))
        sel = rng.choice(len(its), k, replace=False)
        # pad short lists by repeating: duplicates never change the best available reward
        sel = np.resize(sel, M_CANDIDATES)
        cands[t], p[t] = its[sel], lk[sel]
    cold = float((~seen[users]).mean())
    notes = (f"{len(uids)} eligible users (>=10 second-half ratings), {int(seen.sum())} with "
             f"user-ID vectors; {cold:.0%} of rounds are cold users (context from their "
             f"profile slots only)")
    return Stream("movielens", vecs, users, cands, p, rng.random(p.shape),
                  np.unique(cands).astype(np.int64), notes=notes)


def make_stream(env: str, T: int, seed: int, ml_path: str) -> Stream:
    if env == "clustered":
        return make_clustered(T, seed)
    if env == "dynamic":
        return make_dynamic(T, seed)
    return make_movielens(T, seed, ml_path)


# ---------------------------------------------------------------------------- policies
class Policy:
    """Batched bandit policy: choose for B rounds with a frozen model, then learn from them."""

    def choose(self, t: int, users: np.ndarray, cands: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def learn(self, t: int, users: np.ndarray, items: np.ndarray, rewards: np.ndarray,
              probs: np.ndarray) -> None:
        pass

    last_probs: np.ndarray | None = None


class RandomPolicy(Policy):
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def choose(self, t, users, cands):
        return self.rng.integers(0, cands.shape[1], len(users))


def cluster_contexts(s: Stream, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every user's top-K context over ``N_CLUSTERS`` online k-means clusters of user vectors.

    Fitted on the user population before the stream starts (in production the clusters come
    from the live user table); ``(clusters, weights, n_initialized)``.
    """
    rng = np.random.default_rng(seed)
    km = OnlineKMeans(N_CLUSTERS, s.user_vecs.shape[1], seed=seed)
    X = s.user_vecs[np.abs(s.user_vecs).sum(1) > 0]
    for _ in range(3):
        for batch in np.array_split(rng.permutation(X), max(1, len(X) // 256)):
            km.partial_fit(batch)
    cl, w = context_for(s.user_vecs, km.centroids, TOP_K, counts=km.counts)
    return cl, w, km.n_initialized


class DiagPolicy(Policy):
    """Greedy / ε-greedy / Diag-LinUCB on the Diag-LinUCB statistics (``mean`` as pCTR)."""

    def __init__(self, s: Stream, rng: np.random.Generator, alpha: float, epsilon: float,
                 half_life: float) -> None:
        self.cl, self.w, n_init = cluster_contexts(s, int(rng.integers(1 << 30)))
        self.model = DiagLinUCB(n_init, lam=LAM, half_life_s=half_life)
        self.alpha, self.epsilon, self.rng = alpha, epsilon, rng

    def choose(self, t, users, cands):
        out = np.empty(len(users), dtype=np.int64)
        for i, u in enumerate(users):
            if self.epsilon and self.rng.random() < self.epsilon:
                out[i] = self.rng.integers(cands.shape[1])
                continue
            mean, bonus = self.model.score(cands[i], self.cl[u], self.w[u], now=float(t))
            s = mean + self.alpha * bonus + 1e-9 * self.rng.random(len(mean))  # random ties
            out[i] = int(np.argmax(s))
        return out

    def learn(self, t, users, items, rewards, probs):
        self.model.update(items, self.cl[users], self.w[users], rewards,
                          np.full(len(users), float(t)))


class LinUCBPolicy(Policy):
    """MABWiser ``LearningPolicy.LinUCB``: disjoint LinUCB, one ridge model per item."""

    def __init__(self, s: Stream, rng: np.random.Generator, alpha: float) -> None:
        from mabwiser.mab import MAB, LearningPolicy

        self.s, self.rng = s, rng
        self.mab = MAB(arms=[int(a) for a in s.items],
                       learning_policy=LearningPolicy.LinUCB(alpha=alpha, l2_lambda=LAM),
                       seed=int(rng.integers(1 << 30)))
        # fit() once to give every arm its model (A = lambda*I), then undo the dummy row
        self.mab.fit([int(s.items[0])], [0.0], np.zeros((1, s.user_vecs.shape[1])))
        self.mab._imp.arm_to_model[int(s.items[0])].init(num_features=s.user_vecs.shape[1])

    def choose(self, t, users, cands):
        # MABWiser's own per-arm _LinUCB models (mean + alpha * sqrt(x' A^-1 x)), asked only
        # for the candidates: its public predict/partial_fit loop over every arm per call,
        # which on MovieLens (1,682 arms) made it ~30x slower than the other policies.
        X = self.s.user_vecs[users].astype(np.float64)
        models = self.mab._imp.arm_to_model
        out = np.empty(len(users), dtype=np.int64)
        for i in range(len(users)):
            x = X[i : i + 1]
            sc = np.array([models[int(c)].predict(x)[0] for c in cands[i]])
            out[i] = int(np.argmax(sc + 1e-9 * self.rng.random(len(sc))))
        return out

    def learn(self, t, users, items, rewards, probs):
        X = self.s.user_vecs[users].astype(np.float64)
        models = self.mab._imp.arm_to_model
        for a in np.unique(items):
            sel = items == a
            models[int(a)].fit(X[sel], rewards[sel])


class VWPolicy(Policy):
    """Vowpal Wabbit ``cb_explore_adf``; cost = 1 - reward; shared = user vector + clusters."""

    def __init__(self, s: Stream, rng: np.random.Generator, explore: str) -> None:
        import vowpalwabbit

        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf {explore} -q UA -q CA -b 20 --quiet "
            f"--random_seed {int(rng.integers(1 << 20))}",
            quiet=True,
        )
        self.rng = rng
        cl, w, _ = cluster_contexts(s, int(rng.integers(1 << 30)))  # Diag-LinUCB's contexts
        self.shared = [
            "shared |U " + " ".join(f"f{k}:{x:.4f}" for k, x in enumerate(v) if x)
            + " |C " + " ".join(f"c{c}:{x:.4f}" for c, x in zip(cl[u], w[u], strict=True))
            for u, v in enumerate(s.user_vecs)
        ]
        self.pending: list[tuple[list[str], int, float]] = []

    def choose(self, t, users, cands):
        out = np.empty(len(users), dtype=np.int64)
        self.pending = []
        for i, u in enumerate(users):
            ex = [self.shared[u]] + [f"|A i{c}" for c in cands[i]]
            pmf = np.asarray(self.vw.predict(ex), dtype=np.float64)
            pmf = pmf / pmf.sum()
            a = int(self.rng.choice(len(pmf), p=pmf))
            out[i] = a
            self.pending.append((ex, a, float(pmf[a])))
        return out

    def learn(self, t, users, items, rewards, probs):
        for (ex, a, pa), r in zip(self.pending, rewards, strict=True):
            lab = list(ex)
            lab[a + 1] = f"0:{1.0 - r}:{pa} " + lab[a + 1]
            self.vw.learn(lab)


def make_policy(name: str, param: float | None, s: Stream, seed: int, half_life: float) -> Policy:
    rng = np.random.default_rng(seed)
    if name == "random":
        return RandomPolicy(rng)
    if name == "greedy":
        return DiagPolicy(s, rng, 0.0, 0.0, half_life)
    if name == "eps_greedy":
        return DiagPolicy(s, rng, 0.0, float(param), half_life)
    if name == "diag_linucb":
        return DiagPolicy(s, rng, float(param), 0.0, half_life)
    if name == "linucb":
        return LinUCBPolicy(s, rng, float(param))
    if name == "vw_squarecb":
        return VWPolicy(s, rng, f"--squarecb --gamma_scale {param}")
    if name == "vw_epsilon":
        return VWPolicy(s, rng, f"--epsilon {param}")
    if name == "vw_regcb":
        return VWPolicy(s, rng, f"--regcbopt --mellowness {param}")
    raise ValueError(name)


# ---------------------------------------------------------------------------- running
def play_batch(pol: Policy, s: Stream, start: int) -> tuple[slice, np.ndarray, np.ndarray]:
    """Rounds ``start .. start+BATCH`` of ``s``: choose with the frozen model, draw the rewards,
    learn; ``(slice, regret per round, chosen item ids)``."""
    sl = slice(start, min(len(s.users), start + BATCH))
    users, cands = s.users[sl], s.cands[sl]
    a = pol.choose(start, users, cands)
    rows = np.arange(len(a))
    p, u = s.p[sl], s.u[sl]
    rew = (u[rows, a] < p[rows, a]).astype(np.float64)
    pol.learn(start, users, cands[rows, a], rew, np.ones(len(a)))
    return sl, p.max(1) - p[rows, a], cands[rows, a]


def run(job: dict[str, Any]) -> dict[str, Any]:
    """One policy on one stream; stops early at ``deadline_s`` (the horizon is then shorter)."""
    s = make_stream(job["env"], job["T"], job["seed"], job["ml_path"])
    half_life = job["T"] / 4 if job["env"] == "dynamic" else 0.0
    pol = make_policy(job["policy"], job["param"], s, job["seed"] + 17, half_life)
    T = len(s.users)
    regret = np.zeros(T)
    chosen = np.full(T, -1, dtype=np.int64)
    t0 = time.perf_counter()
    done = 0
    for start in range(0, T, BATCH):
        if time.perf_counter() - t0 > job["deadline_s"]:
            break
        sl, regret[sl], chosen[sl] = play_batch(pol, s, start)
        done = sl.stop
    out = {**job, "rounds": done, "seconds": time.perf_counter() - t0,
           "cum_regret": np.cumsum(regret[:done]).tolist()}
    if s.arrivals:
        waits = []
        for j, born in s.arrivals.items():
            hits = np.flatnonzero(chosen[born:done] == j)
            if born < done:
                waits.append(float(hits[0]) if len(hits) else float(done - born))
        out["discovery"] = {"mean_rounds": float(np.mean(waits)) if waits else None,
                            "n_items": len(waits),
                            "found_share": float(np.mean([w < done for w in waits]))}
        out["discovery_waits"] = waits
    out["notes"] = s.notes
    return out


def cached_run(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run`, its result kept under ``job["cache"]`` when set.

    A full run on a shared machine can take long; with ``--cache DIR`` a killed or re-invoked
    run (e.g. with fewer ``--eval-seeds`` to summarise what finished) reuses finished runs.
    The key is the job without its deadline, so use a fresh directory after changing code.
    """
    cache = job.get("cache")
    if not cache:
        return run(job)
    key = json.dumps({k: v for k, v in job.items() if k not in ("cache", "deadline_s")},
                     sort_keys=True)
    path = Path(cache) / f"{hashlib.sha1(key.encode()).hexdigest()}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = run(job)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    tmp.replace(path)
    return out


def score_latency_us(n_items: int = 1_000_000, n_clusters: int = 64, k: int = 4) -> float:
    """Median µs of ``score()`` for 1,000 candidates (half unknown) against ``n_items`` rows."""
    rng = np.random.default_rng(0)
    m = DiagLinUCB(n_clusters)
    for _ in range(n_items // 200_000):
        ids = rng.integers(0, 2**62, 200_000)
        m.update(ids, rng.integers(0, n_clusters, (len(ids), k)), np.full((len(ids), k), 1 / k),
                 (rng.random(len(ids)) < 0.05).astype(float), 0.0)
    known = m.to_arrays()["item_ids"]
    q = np.concatenate([rng.choice(known, 500), rng.integers(0, 2**62, 500)])
    cl, w = rng.choice(n_clusters, k, replace=False), np.full(k, 1 / k)
    times = []
    for _ in range(300):
        t = time.perf_counter()
        m.score(q, cl, w, now=1.0)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e6)


def cluster_drift(n_batches: int = 2000, half_life: float = 100.0) -> dict[str, Any]:
    """Online k-means on a drifting population, with and without decaying counts.

    16 true centres random-walk in 16-d (one step per batch), two of them are replaced by new
    populations half-way; each batch draws 256 users. Per batch we record *churn* — the share of
    the batch's users whose nearest centre changed because of that batch's centroid update (what
    would blur the meaning of the (item, cluster) statistics) — and the *tracking error*, the mean
    distance of the batch's users to their nearest centre (how well the clusters still describe
    the population). Reported over the second half.
    """
    out: dict[str, Any] = {"batches": n_batches, "users_per_batch": 256,
                           "half_life_batches": half_life}
    for name, h in (("decaying", half_life), ("frozen", 0.0)):
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(16, 16))
        km = OnlineKMeans(N_CLUSTERS, 16, seed=0, half_life_s=h)
        churn, err = [], []
        for t in range(n_batches):
            centres += 0.02 * rng.normal(size=centres.shape)
            if t == n_batches // 2:
                centres[:2] = 3.0 * rng.normal(size=(2, 16))
            X = centres[rng.integers(0, 16, 256)] + 0.3 * rng.normal(size=(256, 16))
            full = km.n_initialized == km.n_clusters
            before = km.predict(X) if full else None
            km.partial_fit(X, ts=float(t))
            if before is not None and t >= n_batches // 2:
                after = km.predict(X)
                churn.append(float((after != before).mean()))
                c = km.centroids.astype(np.float64)
                err.append(float(np.linalg.norm(X - c[after], axis=1).mean()))
        out[name] = {"churn_per_batch": float(np.mean(churn)),
                     "tracking_error": float(np.mean(err)), "reseeded": km.reseeded}
    return out


def _mean_ci(xs: list[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval over evaluation seeds (paired: common random numbers)."""
    x = np.asarray(xs, dtype=np.float64)
    out: dict[str, Any] = {"mean": float(x.mean()), "n": len(x), "values": x.tolist()}
    if len(x) > 1:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
        out.update(ci95=[out["mean"] - half, out["mean"] + half], half_width=half)
    return out


PEERS = {"eps_greedy": "regret_ratio_vs_eps_greedy", "vw_squarecb": "regret_ratio_vs_vw_squarecb",
         "vw_regcb": "regret_ratio_vs_vw_regcb", "vw_epsilon": "regret_ratio_vs_vw_epsilon",
         "linucb": "regret_ratio_vs_linucb", "greedy": "regret_ratio_vs_greedy"}


def summarize(e: str, runs: list[dict[str, Any]], tuning: dict[str, dict[str, float]],
              seeds: list[int]) -> dict[str, Any]:
    """One environment: per-seed regret and ratios, then their means with 95% intervals."""
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        rs = {r["policy"]: r for r in runs if r["env"] == e and r["seed"] == seed}
        h = min(r["rounds"] for r in rs.values())
        reg = {p: r["cum_regret"][h - 1] for p, r in rs.items()}
        one: dict[str, Any] = {
            "horizon": h, "regret_per_round": {p: v / h for p, v in reg.items()},
            "seconds": {p: round(r["seconds"], 2) for p, r in rs.items()},
            **{key: reg["diag_linucb"] / reg[p] for p, key in PEERS.items()},
        }
        if "discovery" in rs["random"]:
            one["new_item_discovery_rounds"] = {p: r["discovery"]["mean_rounds"]
                                                for p, r in rs.items()}
        per_seed[str(seed)] = one
    first = per_seed[str(seeds[0])]
    out: dict[str, Any] = {
        "evaluation_seeds": seeds,
        "horizon": min(v["horizon"] for v in per_seed.values()),
        "params": {r["policy"]: r["param"] for r in runs if r["env"] == e},
        "tuning_regret_per_round": tuning,
        "regret_per_round": {p: _mean_ci([v["regret_per_round"][p] for v in per_seed.values()])
                             for p in first["regret_per_round"]},
    }
    for key in PEERS.values():
        ci = _mean_ci([v[key] for v in per_seed.values()])
        out[key] = ci["mean"]
        out[key + "_ci95"] = ci
    if "new_item_discovery_rounds" in first:
        out["new_item_discovery_rounds"] = {
            p: _mean_ci([v["new_item_discovery_rounds"][p] for v in per_seed.values()])
            for p in first["new_item_discovery_rounds"]}
    notes = next((r["notes"] for r in runs if r["env"] == e and r.get("notes")), None)
    if notes:
        out["notes"] = notes
    out["per_seed"] = per_seed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short horizons, under three minutes")
    ap.add_argument("--movielens", default=None,
                    help="MovieLens-100K directory (RecBole or GroupLens layout); default: the "
                         "cached copy, fetched on first use")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", help="results name: bench/results/NAME.json (default bandit, "
                    "bandit_quick with --quick)")
    ap.add_argument("--rounds", type=int, help="override the horizon (smoke tests)")
    ap.add_argument("--eval-seeds", help="comma-separated evaluation seeds (default 2 / 2,3,4)")
    ap.add_argument("--cache", help="directory keeping finished runs (resume a long run)")
    ap.add_argument("--no-latency", action="store_true", help="skip the score() timing")
    ap.add_argument("--envs", default="clustered,dynamic,movielens",
                    help="comma-separated environments")
    args = ap.parse_args()
    args.out = args.out or ("bandit_quick" if args.quick else "bandit")
    # The runs go to parallel worker processes: each gets its share of the CPUs (inherited).
    apply_thread_budget(max(1, cpu_budget() // args.workers))
    T = args.rounds or (10_000 if args.quick else 40_000)
    # Knobs are tuned on seed 1 at 5,000 rounds in both modes (every policy alike; the full
    # mode's tuning runs are the quick mode's, so a shared --cache does them once).
    T_tune = min(T, 5_000)
    tune_seeds = [1]
    eval_seeds = [2] if args.quick else [2, 3, 4]
    if args.eval_seeds:
        eval_seeds = [int(x) for x in args.eval_seeds.split(",")]
    if set(eval_seeds) & set(tune_seeds):
        raise SystemExit("evaluation seeds must differ from the tuning seeds")
    deadline = 30.0 if args.quick else 900.0  # per run, wall; a cut run shortens the horizon
    envs = args.envs.split(",")
    skipped = {}
    ml_path = movielens_dir(args.movielens) if "movielens" in envs else None
    if "movielens" in envs and ml_path is None:
        envs.remove("movielens")
        skipped["movielens"] = "MovieLens-100K unavailable"
    base: dict[str, Any] = {"ml_path": ml_path}
    if args.cache:
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        base["cache"] = args.cache
    t_start = time.perf_counter()

    # 1. tune every knob on the tuning seeds (never an evaluation seed), same grid size for all
    tune_jobs = [{**base, "env": e, "policy": p, "param": v, "T": T_tune, "seed": seed,
                  "deadline_s": deadline / 2}
                 for e in envs for p, (_, grid) in GRIDS.items() for v in grid
                 for seed in tune_seeds]
    with ProcessPoolExecutor(args.workers) as ex:
        tuned_runs = list(ex.map(cached_run, tune_jobs))
    best: dict[tuple[str, str], float] = {}
    tuning: dict[str, dict[str, dict[str, float]]] = {e: {} for e in envs}
    for e in envs:
        for p, (_, grid) in GRIDS.items():
            rs = [r for r in tuned_runs if r["env"] == e and r["policy"] == p]
            h = min(r["rounds"] for r in rs)
            scores = {str(v): float(np.mean([r["cum_regret"][h - 1] / h for r in rs
                                             if r["param"] == v])) for v in grid}
            best[(e, p)] = min(grid, key=lambda v, sc=scores: sc[str(v)])
            tuning[e][p] = scores

    # 2. evaluate each policy once per evaluation seed with its tuned knob
    jobs = [{**base, "env": e, "policy": p, "param": best.get((e, p)), "T": T, "seed": seed,
             "deadline_s": deadline} for seed in eval_seeds for e in envs for p in POLICIES]
    with ProcessPoolExecutor(args.workers) as ex:
        runs = list(ex.map(cached_run, jobs))

    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "shared": {"candidates": M_CANDIDATES, "batch": BATCH, "n_clusters": N_CLUSTERS,
                   "top_k": TOP_K, "lambda": LAM, "horizon": T, "tuning_horizon": T_tune,
                   "tuning_seeds": tune_seeds, "evaluation_seeds": eval_seeds,
                   "deadline_s": deadline, "tuning_grids": {p: g for p, g in GRIDS.items()}},
        "environments": {}, "skipped": skipped,
    }
    print(f"\n{'env':10} {'policy':12} {'param':>8} {'regret/rd (mean over seeds)':>28}")
    for e in envs:
        env_out = summarize(e, runs, tuning[e], eval_seeds)
        results["environments"][e] = env_out
        for p in POLICIES:
            par = env_out["params"][p]
            par = "" if par is None else f"{par:g}"
            rr = env_out["regret_per_round"][p]
            print(f"{e:10} {p:12} {par:>8} {rr['mean']:10.4f} ± {rr.get('half_width', 0):.4f}")
        for key in ("regret_ratio_vs_eps_greedy", "regret_ratio_vs_vw_squarecb",
                    "regret_ratio_vs_vw_regcb"):
            ci = env_out[key + "_ci95"]
            print(f"{e:10} Diag-LinUCB {key[13:]:>16} = {ci['mean']:.3f} ± "
                  f"{ci.get('half_width', 0):.3f}")
        if "new_item_discovery_rounds" in env_out:
            d = env_out["new_item_discovery_rounds"]
            print(f"{e:10} new-item discovery (rounds): " + ", ".join(
                f"{p} {v['mean']:.0f}" for p, v in d.items()))

    results["cluster_drift"] = drift = cluster_drift()
    dec, frz = drift["decaying"], drift["frozen"]
    print(f"cluster drift (second half): churn/batch decaying {dec['churn_per_batch']:.4f} vs "
          f"frozen {frz['churn_per_batch']:.4f}; tracking error {dec['tracking_error']:.3f} vs "
          f"{frz['tracking_error']:.3f}; re-seeded {dec['reseeded']}")
    us = float("nan") if args.no_latency else score_latency_us()
    results["score_us_1000_candidates"] = None if args.no_latency else us
    results["score_setup"] = "1M items x 64 clusters, K=4, 1,000 candidates (half unknown), median"
    env_vals = results["environments"].values()
    disc = results["environments"].get("dynamic", {}).get("new_item_discovery_rounds", {})
    vw_disc = [disc[p]["mean"] for p in ("vw_squarecb", "vw_epsilon", "vw_regcb") if p in disc]
    results["targets"] = {
        "regret_vs_eps_greedy_le_0.7": all(v["regret_ratio_vs_eps_greedy"] <= 0.7
                                           for v in env_vals),
        "regret_vs_vw_squarecb_le_0.9": all(v["regret_ratio_vs_vw_squarecb"] <= 0.9
                                            for v in env_vals),
        "discovery_no_slower_than_every_vw": bool(disc) and bool(vw_disc) and
        disc["diag_linucb"]["mean"] <= min(vw_disc),
        "score_1000_le_1ms": None if args.no_latency else us <= 1000.0,
    }
    results["wall_seconds"] = time.perf_counter() - t_start
    print(f"score() for 1,000 candidates: {us:.0f} µs; wall {results['wall_seconds']:.0f} s")
    print("targets:", results["targets"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot([r for r in runs if r["seed"] == eval_seeds[0]], envs, RESULTS / f"{args.out}.png")


def plot(runs: list[dict[str, Any]], envs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 4), squeeze=False)
    for ax, e in zip(axes[0], envs, strict=True):
        for r in (r for r in runs if r["env"] == e):
            ax.plot(r["cum_regret"], label=r["policy"], lw=2 if r["policy"] == "diag_linucb" else 1)
        ax.set_title(e)
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative regret")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
