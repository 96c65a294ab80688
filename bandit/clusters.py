"""Online mini-batch k-means over user embeddings: the coordinates of the Diag-LinUCB context.

Sculley (2010), "Web-scale k-means clustering": each centre keeps a count ``v`` and moves towards
every point assigned to it with learning rate ``1/v``. Within one mini-batch the points are assigned
with the centres as they were at the start of the batch, so the per-point updates of one centre
telescope into a running mean, ``c <- (v*c + sum(x)) / (v + n)``, which we compute in one
vectorised step.

Drift (``half_life_s > 0``): counts decay in event time, ``v <- v * 0.5^(Δt/half_life)``, so a
centre's learning rate stops falling towards 0 and settles near ``1/(points per half-life)``:
it keeps following the users it holds while they (and their embeddings) move, yet moves by a
small step per batch, which keeps indices stable enough for the (item, cluster) statistics keyed
on them. A centre whose decayed count drops below ``min_count`` has held no user for several
half-lives: it is *empty* and is re-seeded by k-means++ sampling from the next batch (the point
farthest from the other centres is the likeliest), so no index is wasted on a population that
left. The Diag-LinUCB statistics of that index were built by users gone as long, so with the same
half-life on the statistics they have faded too. ``reseeded`` counts re-seeds for metrics.

All-zero rows (users without an embedding yet) are ignored: they would otherwise capture a
centre of their own that means "no information".

>>> import numpy as np
>>> km = OnlineKMeans(n_clusters=2, dim=2, seed=0)
>>> X = np.array([[0, 0.1], [0, -0.1], [10, 0.1], [10, -0.1]], dtype=np.float32)
>>> km.partial_fit(X)
>>> sorted(np.round(km.centroids[:, 0]).tolist())
[0.0, 10.0]
"""

from __future__ import annotations

import numpy as np


def _nearest_d2(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distance of each row of ``X`` to its nearest row of ``centers`` (at least one).

    One centre at a time: an ``(n, k, dim)`` temporary moves more memory than the arithmetic
    costs. Each distance is summed exactly as ``((X - c) ** 2).sum(-1)``.
    """
    d2 = ((X - centers[0]) ** 2).sum(-1)
    for c in centers[1:]:
        np.minimum(d2, ((X - c) ** 2).sum(-1), out=d2)
    return d2


class OnlineKMeans:
    """Mini-batch k-means with per-centre ``1/count`` learning rates, fed one batch at a time.

    Centres are initialised by k-means++ on the first points seen. If fewer distinct points than
    ``n_clusters`` have arrived, only that many centres exist (``n_initialized``) and the rest are
    filled by k-means++ sampling from later batches; ``centroids`` returns only the initialised
    ones, so cluster indices ``0..n_initialized-1`` are always valid and never change meaning.
    """

    def __init__(self, n_clusters: int, dim: int, seed: int = 0, half_life_s: float = 0.0,
                 min_count: float = 1.0) -> None:
        if n_clusters < 1 or dim < 1:
            raise ValueError("n_clusters and dim must be >= 1")
        if not half_life_s >= 0 or not min_count > 0:
            raise ValueError("half_life_s must be >= 0 and min_count > 0")
        self.n_clusters = n_clusters
        self.dim = dim
        self.half_life_s = float(half_life_s)
        self.min_count = float(min_count)
        self._rng = np.random.default_rng(seed)
        self._centers = np.zeros((n_clusters, dim), dtype=np.float64)
        self._counts = np.zeros(n_clusters, dtype=np.float64)
        self._n_init = 0
        self.clock = -np.inf  # event time the counts refer to
        self.reseeded = 0  # centres re-seeded after emptying (cumulative)

    @property
    def n_initialized(self) -> int:
        """How many centres exist so far (``n_clusters`` once enough distinct points arrived)."""
        return self._n_init

    @property
    def centroids(self) -> np.ndarray:
        """The initialised centres, float32 ``(n_initialized, dim)`` (a copy)."""
        return self._centers[: self._n_init].astype(np.float32)

    @property
    def counts(self) -> np.ndarray:
        """(Decayed) points absorbed by each initialised centre, float64 ``(n_initialized,)``."""
        return self._counts[: self._n_init].copy()

    def _decay_to(self, ts: float | None) -> None:
        if ts is None or not np.isfinite(ts):
            return
        if self.half_life_s > 0 and np.isfinite(self.clock) and ts > self.clock:
            self._counts *= np.exp2(-(ts - self.clock) / self.half_life_s)
        self.clock = max(self.clock, float(ts))

    def _reseed_empty(self, X: np.ndarray) -> np.ndarray:
        """Re-seed centres whose decayed count fell below ``min_count``; return unused points."""
        empty = np.flatnonzero(self._counts[: self._n_init] < self.min_count)
        if len(empty) == 0 or len(X) == 0:
            return X
        live = np.setdiff1d(np.arange(self._n_init), empty)
        used = np.zeros(len(X), dtype=bool)
        # Squared distance to the nearest live centre, kept up to date as centres are added
        # (the minimum with the new centre's distances) instead of recomputed against every
        # live centre for each empty one: the same numbers, one pass over the live centres.
        nearest = _nearest_d2(X, self._centers[live]) if live.size else None
        for j in empty:
            d2 = np.ones(len(X)) if nearest is None else nearest.copy()
            d2[used] = 0.0
            total = d2.sum()
            if total <= 1e-12:
                break
            i = int(self._rng.choice(len(X), p=d2 / total))
            self._centers[j] = X[i]
            self._counts[j] = 1.0
            used[i] = True
            to_new = ((X - self._centers[j]) ** 2).sum(-1)
            nearest = to_new if nearest is None else np.minimum(nearest, to_new)
            self.reseeded += 1
        return X[~used]

    def _seed_centers(self, X: np.ndarray) -> np.ndarray:
        """k-means++ from ``X`` until all centres exist; return the points not used as seeds.

        The distance to the nearest centre is kept up to date as seeds are added (the minimum
        with the new seed's distances), as in :meth:`_reseed_empty`: until every centre exists,
        this runs on every batch, and recomputing it against every centre per seed was the
        exploration hook's largest cost.
        """
        used = np.zeros(len(X), dtype=bool)
        nearest = _nearest_d2(X, self._centers[: self._n_init]) if self._n_init else None
        while self._n_init < self.n_clusters:
            if nearest is None:
                i = int(self._rng.integers(len(X)))
            else:
                d2 = nearest.copy()
                d2[used] = 0.0
                total = d2.sum()
                if total <= 1e-12:  # every remaining point duplicates a centre
                    break
                i = int(self._rng.choice(len(X), p=d2 / total))
            self._centers[self._n_init] = X[i]
            self._counts[self._n_init] = 1
            used[i] = True
            self._n_init += 1
            if used.all():
                break
            to_new = ((X - X[i]) ** 2).sum(-1)
            nearest = to_new if nearest is None else np.minimum(nearest, to_new)
        return X[~used]

    def partial_fit(self, X: np.ndarray, ts: float | None = None) -> None:
        """Absorb one mini-batch of points ``float[n, dim]``; all-zero rows are skipped.

        ``ts``: the batch's event time; counts decay to it first (with a half-life).
        """
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.dim)
        X = X[np.isfinite(X).all(1) & (np.abs(X).sum(1) > 0)]
        self._decay_to(ts)
        if len(X) == 0:
            return
        if self._n_init < self.n_clusters:
            X = self._seed_centers(X)
        elif self.half_life_s > 0:
            X = self._reseed_empty(X)
        if len(X) == 0:
            return
        labels = self.predict(X)
        n = np.bincount(labels, minlength=self._n_init).astype(np.float64)
        sums = np.zeros((self._n_init, self.dim))
        np.add.at(sums, labels, X)
        hit = n > 0
        v = self._counts[: self._n_init]
        c = self._centers[: self._n_init]
        c[hit] = (v[hit, None] * c[hit] + sums[hit]) / (v[hit] + n[hit])[:, None]
        self._counts[: self._n_init] += n

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the nearest initialised centre for each row, int64 ``(n,)``."""
        if self._n_init == 0:
            raise ValueError("no centres yet: call partial_fit with non-zero points first")
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.dim)
        c = self._centers[: self._n_init]
        d2 = (X * X).sum(1)[:, None] - 2.0 * X @ c.T + (c * c).sum(1)[None, :]
        return d2.argmin(1).astype(np.int64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for checkpoints (``np.savez``, Redis); no pickle needed to restore."""
        return {
            "centers": self._centers.copy(),
            "counts": self._counts.copy(),
            "n_init": np.array(self._n_init, dtype=np.int64),
            "half_life_s": np.array(self.half_life_s),
            "min_count": np.array(self.min_count),
            "clock": np.array(self.clock),
            "reseeded": np.array(self.reseeded, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], seed: int = 0) -> OnlineKMeans:
        """Rebuild from :meth:`to_arrays` output."""
        centers = np.asarray(arrays["centers"], dtype=np.float64)
        km = cls(centers.shape[0], centers.shape[1], seed=seed,
                 half_life_s=float(arrays.get("half_life_s", 0.0)),
                 min_count=float(arrays.get("min_count", 1.0)))
        km._centers[:] = centers
        km._counts[:] = np.asarray(arrays["counts"], dtype=np.float64)
        km._n_init = int(arrays["n_init"])
        km.clock = float(arrays.get("clock", -np.inf))
        km.reseeded = int(arrays.get("reseeded", 0))
        return km
