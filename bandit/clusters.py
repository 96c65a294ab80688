"""Online mini-batch k-means over user embeddings: the coordinates of the Diag-LinUCB context.

Sculley (2010), "Web-scale k-means clustering": each centre keeps a count ``v`` and moves towards
every point assigned to it with learning rate ``1/v``. Within one mini-batch the points are assigned
with the centres as they were at the start of the batch, so the per-point updates of one centre
telescope into a running mean, ``c <- (v*c + sum(x)) / (v + n)``, which we compute in one
compiled pass. A point may carry a multiplicity (``weights``): the trainer passes each distinct
user of a batch once, weighing as many events as it has, and the centres move exactly as they
would for every copy.

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
from numba import njit


def _nearest_d2(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distance of each row of ``X`` to its nearest row of ``centers`` (at least one).

    One centre at a time: an ``(n, k, dim)`` temporary moves more memory than the arithmetic
    costs. Each distance is summed exactly as ``((X - c) ** 2).sum(-1)``.
    """
    d2 = ((X - centers[0]) ** 2).sum(-1)
    for c in centers[1:]:
        np.minimum(d2, ((X - c) ** 2).sum(-1), out=d2)
    return d2


@njit(cache=True)
def _absorb(X: np.ndarray, w: np.ndarray, labels: np.ndarray, centers: np.ndarray,
            counts: np.ndarray) -> None:
    """Move each centre to the running mean of its count's worth of points and the weighted
    points assigned to it: ``c <- (v*c + sum(w*x)) / (v + sum(w))``, ``v <- v + sum(w)``."""
    k, dim = centers.shape
    sums = np.zeros((k, dim))
    n = np.zeros(k)
    for i in range(X.shape[0]):
        j = labels[i]
        n[j] += w[i]
        for t in range(dim):
            sums[j, t] += w[i] * X[i, t]
    for j in range(k):
        if n[j] > 0:
            for t in range(dim):
                centers[j, t] = (counts[j] * centers[j, t] + sums[j, t]) / (counts[j] + n[j])
            counts[j] += n[j]


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

    def _draw(self, p: np.ndarray) -> int | None:
        """An index drawn with probability proportional to ``p``; None if ``p`` has no mass."""
        total = p.sum()
        if total <= 1e-12:
            return None
        return int(self._rng.choice(len(p), p=p / total))

    def _reseed_empty(self, X: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-seed centres whose decayed count fell below ``min_count``; return the points
        (and multiplicities) not used as seeds."""
        empty = np.flatnonzero(self._counts[: self._n_init] < self.min_count)
        if len(empty) == 0 or len(X) == 0:
            return X, w
        live = np.setdiff1d(np.arange(self._n_init), empty)
        w = w.copy()
        # Squared distance to the nearest live centre, kept up to date as centres are added
        # (the minimum with the new centre's distances) instead of recomputed against every
        # live centre for each empty one: the same numbers, one pass over the live centres.
        nearest = _nearest_d2(X, self._centers[live]) if live.size else None
        for j in empty:
            i = self._draw(w if nearest is None else nearest * w)
            if i is None:
                break
            self._centers[j] = X[i]
            self._counts[j] = 1.0
            w[i] = max(w[i] - 1.0, 0.0)
            to_new = ((X - self._centers[j]) ** 2).sum(-1)
            nearest = to_new if nearest is None else np.minimum(nearest, to_new)
            self.reseeded += 1
        keep = w > 0
        return X[keep], w[keep]

    def _seed_centers(self, X: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """k-means++ from ``X`` (row i standing for ``w[i]`` equal points) until all centres
        exist; return the points and multiplicities not used as seeds.

        A seed is drawn with probability proportional to multiplicity times the squared
        distance to the nearest centre, exactly k-means++ over the expanded points, and uses up
        one of its point's copies. The distance to the nearest centre is kept up to date as
        seeds are added (the minimum with the new seed's distances): until every centre exists
        this runs on every batch.
        """
        w = w.copy()
        nearest = _nearest_d2(X, self._centers[: self._n_init]) if self._n_init else None
        while self._n_init < self.n_clusters:
            i = self._draw(w if nearest is None else nearest * w)
            if i is None:  # every remaining point duplicates a centre
                break
            self._centers[self._n_init] = X[i]
            self._counts[self._n_init] = 1
            w[i] = max(w[i] - 1.0, 0.0)
            self._n_init += 1
            to_new = ((X - X[i]) ** 2).sum(-1)
            nearest = to_new if nearest is None else np.minimum(nearest, to_new)
        keep = w > 0
        return X[keep], w[keep]

    def partial_fit(self, X: np.ndarray, ts: float | None = None,
                    weights: np.ndarray | None = None,
                    nearest: np.ndarray | None = None) -> None:
        """Absorb one mini-batch of points ``float[n, dim]``; all-zero rows are skipped.

        ``ts``: the batch's event time; counts decay to it first (with a half-life).
        ``weights``: each row's multiplicity (a positive whole number): a row of weight m is
        absorbed exactly as m copies of it would be, so a batch can pass each distinct point
        once. ``nearest``: ``predict(X)`` if the caller has it already; used unless this batch
        seeds or re-seeds a centre (which moves the centres before the points are assigned).
        """
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.dim)
        w = (np.ones(len(X)) if weights is None
             else np.asarray(weights, dtype=np.float64).reshape(len(X)))
        if not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError("weights must be finite and positive")
        ok = np.isfinite(X).all(1) & (np.abs(X).sum(1) > 0)
        X, w = X[ok], w[ok]
        labels = None if nearest is None else np.asarray(nearest, dtype=np.int64)[ok]
        self._decay_to(ts)
        if len(X) == 0:
            return
        reseeded = self.reseeded
        if self._n_init < self.n_clusters:
            X, w = self._seed_centers(X, w)
            labels = None
        elif self.half_life_s > 0:
            X, w = self._reseed_empty(X, w)
        if self.reseeded != reseeded:
            labels = None
        if len(X) == 0:
            return
        _absorb(X, w, self.predict(X) if labels is None else labels,
                self._centers[: self._n_init], self._counts[: self._n_init])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the nearest initialised centre for each row, int64 ``(n,)``."""
        if self._n_init == 0:
            raise ValueError("no centres yet: call partial_fit with non-zero points first")
        X = np.asarray(X, dtype=np.float64).reshape(-1, self.dim)
        c = self._centers[: self._n_init]
        # |x - c|^2 without |x|^2, which is the same for every centre of a row.
        d2 = (c * c).sum(1)[None, :] - 2.0 * X @ c.T
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
