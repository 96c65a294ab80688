"""Diag-LinUCB (Online Matching, RecSys 2023): per-item diagonal LinUCB on sparse cluster contexts.

For item j and context coordinate (user cluster) c we keep two scalars,

    d_jc = λ + Σ w_c²        b_jc = Σ w_c·r

over the events that showed j to a user whose context put weight w_c on c. For a user with
context w (a few clusters, weights summing to 1):

    mean_j  = Σ_c w_c · b_jc / d_jc          bonus_j = sqrt(Σ_c w_c² / d_jc)

This is LinUCB with the design matrix replaced by its diagonal, so there is no inverse, an update
touches K scalars per event, and — the property the streaming system depends on — the statistics
are sums: shards add, in any order. With K = 1 it is exactly disjoint LinUCB on one-hot contexts.
The caller ranks by ``pCTR + α·bonus``; ``mean`` is *not* a calibrated probability when K > 1
(b/d estimates ``CTR/w`` per coordinate), so it is returned for diagnostics and pure-bandit use
but must not be blended with pCTR as if it were one.

Forgetting (``half_life_s > 0``): the data parts ``d-λ`` and ``b`` of an item are discounted by
``0.5^(Δt/half_life)`` in event time, lazily — each item stores the event time its statistics
refer to; an update first ages the item to the newest event time, and an event older than that is
added already discounted. The state is therefore ``Σ_events 0.5^((t_item - t_event)/h) · stats``,
independent of arrival order, which keeps merges exact under decay. ``d`` never drops below λ.

Idempotence: ``update(..., event_ids=...)`` skips ids already applied. Memory is bounded: the
model remembers the last ``dedup_capacity`` applied ids (a FIFO window of whole batches,
:class:`bandit.recent_ids.RecentIds`), so a duplicate is caught
if fewer than ``dedup_capacity`` distinct events were applied between the two copies. At ~100 bytes
per id the default 1,000,000 ids cost ~100 MB; size it to (events/s × redelivery horizon).

Serving: the same class is the read-only scorer (the "BanditView"). The trainer publishes
``changes_since(v)`` (rows aged to ``clock``); a server builds the model with :meth:`from_arrays`
and applies each delta with :meth:`patch`, then calls only :meth:`score`.

>>> import numpy as np
>>> m = DiagLinUCB(n_clusters=4, lam=1.0)
>>> m.update(np.array([7, 7]), np.array([[0], [0]]), np.ones((2, 1)), np.array([1.0, 0.0]), 0.0)
2
>>> mean, bonus = m.score(np.array([7, 8]), np.array([0]), np.array([1.0]))
>>> mean.round(3).tolist(), bonus.round(3).tolist()
([0.333, 0.0], [0.577, 1.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit

from bandit.recent_ids import RecentIds

_NO_TIME = -np.inf  # a row that has never seen an event (or an empty model's clock)



@njit(cache=True)
def _score_ids(sorted_ids: np.ndarray, sorted_rows: np.ndarray, d: np.ndarray, b: np.ndarray,
               t: np.ndarray, ids: np.ndarray, cl: np.ndarray, w: np.ndarray, lam: float,
               half_life_s: float, now: float) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`DiagLinUCB.score` per candidate, compiled, each item's row found by binary search
    inside: one user's context is a handful of clusters, and the same arithmetic as ~15 numpy
    calls on (m, K) arrays cost ~80 µs (the lookup's four numpy calls were another ~10-30 µs,
    more with the caches cold a serving worker meets).

    ``half_life_s > 0``: statistics aged from their row time to ``now`` on the fly.
    """
    m, k, n = ids.shape[0], cl.shape[0], sorted_ids.shape[0]
    mean = np.zeros(m)
    bonus = np.empty(m)
    for i in range(m):
        j = np.searchsorted(sorted_ids, ids[i]) if n else 0
        found = j < n and sorted_ids[j] == ids[i]
        row = sorted_rows[j] if found else 0
        f = 1.0
        if found and half_life_s > 0.0:
            dt = max(now - t[row], 0.0)
            if np.isfinite(dt):
                f = 2.0 ** (-dt / half_life_s)
        acc_mean, acc_bonus = 0.0, 0.0
        for q in range(k):
            if found:
                dd = lam + (d[row, cl[q]] - lam) * f
                bb = b[row, cl[q]] * f
            else:
                dd, bb = lam, 0.0
            inv = 1.0 / dd
            acc_mean += bb * inv * w[q]
            acc_bonus += inv * w[q] * w[q]
        mean[i] = acc_mean
        bonus[i] = np.sqrt(acc_bonus)
    return mean, bonus


@njit(cache=True)
def _accumulate(d: np.ndarray, b: np.ndarray, t_row: np.ndarray, rv: np.ndarray,
                rows: np.ndarray, cl: np.ndarray, w: np.ndarray, r: np.ndarray, t: np.ndarray,
                half_life: float, lam: float, version: int) -> None:
    """Add events to their rows' statistics, in place (the core of :meth:`DiagLinUCB.update`).

    Each touched row is first aged to the newest time among its own and its events' (with a
    half-life), and stamped with ``version``; then every event adds ``f·w²`` to ``d`` and
    ``f·w·r`` to ``b`` at its clusters, ``f`` discounting an event older than its row's new
    time. Events add in their order, one cluster after the other.
    """
    n, k = cl.shape
    order = np.argsort(rows, kind="mergesort")
    newest = np.empty(n)  # per event: its row's time after this update
    i = 0
    while i < n:
        row = rows[order[i]]
        j = i
        to = t_row[row]
        while j < n and rows[order[j]] == row:
            to = max(to, t[order[j]])
            j += 1
        if half_life > 0:
            dt = to - t_row[row]
            f = np.exp2(-max(dt, 0.0) / half_life) if np.isfinite(dt) else 0.0
            for c in range(d.shape[1]):
                d[row, c] = lam + (d[row, c] - lam) * f
                b[row, c] *= f
        t_row[row] = to
        rv[row] = version
        for q in range(i, j):
            newest[order[q]] = to
        i = j
    for e in range(n):
        row = rows[e]
        f = np.exp2(-(newest[e] - t[e]) / half_life) if half_life > 0 else 1.0
        for q in range(k):
            c = cl[e, q]
            d[row, c] += f * w[e, q] * w[e, q]
            b[row, c] += f * w[e, q] * r[e]


class DiagLinUCB:
    """Per-item, per-cluster Diag-LinUCB statistics with decay, merge, dedup and versioned deltas.

    Args:
        n_clusters: context coordinates C (clusters of user embeddings).
        lam: ridge prior λ > 0; unknown items have ``d = λ`` and so the largest bonus,
            ``sqrt(Σ w²/λ)``.
        half_life_s: event-time half-life of the statistics; 0 disables forgetting.
        dedup_capacity: how many recent event ids are remembered for idempotent updates.
    """

    def __init__(
        self,
        n_clusters: int,
        lam: float = 1.0,
        half_life_s: float = 0.0,
        dedup_capacity: int = 1_000_000,
    ) -> None:
        if n_clusters < 1:
            raise ValueError("n_clusters must be >= 1")
        if not lam > 0:
            raise ValueError("lam must be > 0")
        if half_life_s < 0:
            raise ValueError("half_life_s must be >= 0")
        self.n_clusters = int(n_clusters)
        self.lam = float(lam)
        self.half_life_s = float(half_life_s)
        self.dedup_capacity = int(dedup_capacity)
        self.version = 0
        self.clock = _NO_TIME  # newest event time seen
        self._n = 0
        self._alloc(16)
        self._sorted_ids = np.empty(0, dtype=np.int64)
        self._sorted_rows = np.empty(0, dtype=np.int64)
        self._seen = RecentIds(self.dedup_capacity)

    # ------------------------------------------------------------------ storage
    def _alloc(self, cap: int) -> None:
        C = self.n_clusters
        # Rows past ``_n`` are set when they come into use (:meth:`_rows_for`): filling the
        # whole capacity at every doubling wrote memory no row used yet.
        self._row_ids = np.zeros(cap, dtype=np.int64)
        self._d = np.empty((cap, C), dtype=np.float64)
        self._b = np.zeros((cap, C), dtype=np.float64)
        self._t = np.empty(cap, dtype=np.float64)
        self._rv = np.zeros(cap, dtype=np.int64)

    def _grow(self, need: int) -> None:
        cap = len(self._row_ids)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        old = (self._row_ids, self._d, self._b, self._t, self._rv)
        self._alloc(new_cap)
        n = self._n
        for dst, src in zip((self._row_ids, self._d, self._b, self._t, self._rv), old, strict=True):
            dst[:n] = src[:n]

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` and a found mask (rows of missing ids are 0, not meaningful)."""
        if len(self._sorted_ids) == 0:
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        pos = self._sorted_ids.searchsorted(ids)
        np.minimum(pos, len(self._sorted_ids) - 1, out=pos)
        found = self._sorted_ids[pos] == ids
        return self._sorted_rows[pos], found

    def _rows_for(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids``, creating rows (d = λ, b = 0) for ids not seen before."""
        rows, found = self._lookup(ids)
        if found.all():
            return rows
        new = np.unique(ids[~found])
        start = self._n
        self._grow(start + len(new))
        new_rows = np.arange(start, start + len(new), dtype=np.int64)
        self._row_ids[new_rows] = new
        self._d[new_rows] = self.lam
        self._b[new_rows] = 0.0
        self._t[new_rows] = _NO_TIME
        self._rv[new_rows] = 0
        self._n += len(new)
        # np.insert into the sorted index is O(n) per batch with new items, not O(n log n).
        ins = np.searchsorted(self._sorted_ids, new)
        self._sorted_ids = np.insert(self._sorted_ids, ins, new)
        self._sorted_rows = np.insert(self._sorted_rows, ins, new_rows)
        rows, _ = self._lookup(ids)
        return rows

    def _age(self, rows: np.ndarray, to: np.ndarray) -> None:
        """Discount the data part of ``rows`` (unique) from their time to ``to`` (>= theirs)."""
        if self.half_life_s > 0:
            dt = to - self._t[rows]
            f = np.where(np.isfinite(dt), np.exp2(-np.maximum(dt, 0.0) / self.half_life_s), 0.0)
            lam = self.lam
            self._d[rows] = lam + (self._d[rows] - lam) * f[:, None]
            self._b[rows] *= f[:, None]
        self._t[rows] = to

    # ------------------------------------------------------------------ learning
    def update(
        self,
        item_ids: np.ndarray,
        clusters: np.ndarray,
        weights: np.ndarray,
        rewards: np.ndarray,
        ts: np.ndarray | float,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Add a batch of (item, context, reward) events; return how many were applied.

        Args:
            item_ids: int64 ``(n,)`` item feature IDs.
            clusters: int64 ``(n, k)`` context coordinates in ``[0, n_clusters)``.
            weights: float64 ``(n, k)`` context weights (the serve-time context of the impression).
            rewards: float64 ``(n,)``, e.g. click = 1, no click = 0.
            ts: event times in seconds, ``(n,)`` or one scalar for the batch.
            event_ids: optional ids; events whose id was applied before (within the dedup
                window, or earlier in this batch) are skipped.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        n = len(ids)
        cl = np.asarray(clusters, dtype=np.int64).reshape(n, -1)
        w = np.asarray(weights, dtype=np.float64).reshape(n, -1)
        r = np.asarray(rewards, dtype=np.float64).ravel()
        t = np.broadcast_to(np.asarray(ts, dtype=np.float64), (n,))
        if cl.shape != w.shape or len(r) != n:
            raise ValueError(
                f"shape mismatch: clusters {cl.shape}, weights {w.shape}, rewards {r.shape}"
            )
        if n and (cl.min() < 0 or cl.max() >= self.n_clusters):
            raise ValueError(f"cluster index outside [0, {self.n_clusters})")
        if not (np.isfinite(w).all() and np.isfinite(r).all() and np.isfinite(t).all()):
            raise ValueError("weights, rewards and ts must be finite")
        if event_ids is not None:
            if len(event_ids) != n:
                raise ValueError("event_ids must have one id per event")
            keep = self._seen.admit(event_ids)
            ids, cl, w, r, t = ids[keep], cl[keep], w[keep], r[keep], t[keep]
            n = len(ids)
        if n == 0:
            return 0

        rows = self._rows_for(ids)
        self.version += 1
        _accumulate(self._d, self._b, self._t, self._rv, rows, np.ascontiguousarray(cl),
                    np.ascontiguousarray(w), np.ascontiguousarray(r), np.ascontiguousarray(t),
                    self.half_life_s, self.lam, self.version)
        self.clock = max(self.clock, float(t.max()))
        return n

    def evict(self, item_ids: np.ndarray) -> int:
        """Drop the statistics of ``item_ids`` (e.g. their embedding rows expired); how many.

        Without this the statistics of every item ever seen stay forever, though an item whose
        rows expired is scored from scratch anyway. Rows are compacted; versions are bumped
        so a delta reader sees the change.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        n = self._n
        if n == 0 or ids.size == 0:
            return 0
        keep = ~np.isin(self._row_ids[:n], ids)
        gone = n - int(keep.sum())
        if gone == 0:
            return 0
        kept = np.flatnonzero(keep)
        m = len(kept)
        for a in (self._row_ids, self._d, self._b, self._t, self._rv):
            a[:m] = a[kept]
        self._d[m:n] = self.lam
        self._b[m:n] = 0.0
        self._t[m:n] = _NO_TIME
        self._n = m
        order = np.argsort(self._row_ids[:m], kind="stable")
        self._sorted_ids = self._row_ids[:m][order]
        self._sorted_rows = order.astype(np.int64)
        self.version += 1
        return gone

    def merge(self, other: DiagLinUCB) -> None:
        """Add another shard's data parts (d-λ, b) into this one; commutative and associative.

        Both shards are aged to the later of their two times per item before adding, so merging
        under decay equals having applied every event to one model. The other shard's recent
        event ids join this one's dedup window.
        """
        if (other.n_clusters, other.lam, other.half_life_s) != (
            self.n_clusters,
            self.lam,
            self.half_life_s,
        ):
            raise ValueError("can only merge models with the same n_clusters, lam and half_life_s")
        m = other._n
        if m:
            orow = np.arange(m)
            rows = self._rows_for(other._row_ids[:m])
            ot = other._t[:m]
            tnew = np.maximum(self._t[rows], ot)
            self._age(rows, tnew)
            od = other._d[:m] - other.lam
            ob = other._b[:m]
            if self.half_life_s > 0:
                dt = tnew - ot
                f = np.where(np.isfinite(dt), np.exp2(-np.maximum(dt, 0.0) / self.half_life_s), 0.0)
                od, ob = od * f[:, None], ob * f[:, None]
            self._d[rows] += od[orow]
            self._b[rows] += ob[orow]
            self.version += 1
            self._rv[rows] = self.version
        self.clock = max(self.clock, other.clock)
        self._seen.admit(list(other._seen))

    def decay_to(self, now: float) -> None:
        """Age every item's statistics to event time ``now`` (items already newer are untouched).

        This changes the stored representation, not what the model scores at any time ``>= now``
        (:meth:`score` ages lazily), so it does not bump row versions: nothing needs republishing.
        Use it before checkpoints or to find items whose statistics have faded.
        """
        n = self._n
        if n == 0:
            self.clock = max(self.clock, float(now))
            return
        rows = np.flatnonzero(self._t[:n] < now)
        self._age(rows, np.full(len(rows), float(now)))
        self.clock = max(self.clock, float(now))

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        item_ids: np.ndarray,
        clusters: np.ndarray,
        weights: np.ndarray,
        now: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, bonus)`` float64 ``(m,)`` for one user's context over m candidates.

        Unknown items score ``mean = 0`` and the maximal bonus ``sqrt(Σ w²/λ)``. With ``now`` (and
        a half-life) statistics are aged to ``now`` on the fly, without mutating the model.
        """
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        cl = np.ascontiguousarray(clusters, dtype=np.int64).ravel()
        w = np.ascontiguousarray(weights, dtype=np.float64).ravel()
        aged = now is not None and self.half_life_s > 0
        return _score_ids(self._sorted_ids, self._sorted_rows, self._d, self._b, self._t, ids,
                          cl, w, self.lam, self.half_life_s if aged else 0.0,
                          float(now) if aged else 0.0)

    # ------------------------------------------------------------------ publishing
    def changes_since(self, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Rows changed after ``version``: ``(item_ids, d_rows, b_rows, current_version)``.

        Rows are aged to :attr:`clock`, so the receiver applies them with
        ``patch(..., ts=clock)``; a receiver that starts from ``version=0`` gets everything.
        """
        n = self._n
        rows = np.flatnonzero(self._rv[:n] > version)
        d, b = self._d[rows].copy(), self._b[rows].copy()
        if self.half_life_s > 0 and np.isfinite(self.clock) and len(rows):
            dt = np.maximum(self.clock - self._t[rows], 0.0)
            f = np.where(np.isfinite(dt), np.exp2(-dt / self.half_life_s), 0.0)[:, None]
            d = self.lam + (d - self.lam) * f
            b = b * f
        return self._row_ids[rows].copy(), d, b, self.version

    def patch(
        self,
        item_ids: np.ndarray,
        d_rows: np.ndarray,
        b_rows: np.ndarray,
        version: int,
        ts: float | None = None,
    ) -> None:
        """Overwrite rows with published values (serving side); ``ts`` is the publisher's clock."""
        ids = np.asarray(item_ids, dtype=np.int64).ravel()
        if len(ids):
            rows = self._rows_for(ids)
            self._d[rows] = np.maximum(np.asarray(d_rows, dtype=np.float64), self.lam)
            self._b[rows] = np.asarray(b_rows, dtype=np.float64)
            self._t[rows] = self.clock if ts is None else float(ts)
            self._rv[rows] = version
        self.version = max(self.version, int(version))
        if ts is not None:
            self.clock = max(self.clock, float(ts))

    def metadata(self) -> dict[str, Any]:
        """JSON-able header for checkpoints and Redis (arrays go in :meth:`to_arrays`)."""
        return {
            "kind": "diag_linucb",
            "n_clusters": self.n_clusters,
            "lam": self.lam,
            "half_life_s": self.half_life_s,
            "dedup_capacity": self.dedup_capacity,
            "version": self.version,
            "clock": self.clock if np.isfinite(self.clock) else None,
            "n_items": self._n,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Every piece of state as plain arrays (``np.savez``-able without pickle)."""
        n = self._n
        return {
            "item_ids": self._row_ids[:n].copy(),
            "d": self._d[:n].copy(),
            "b": self._b[:n].copy(),
            "t": self._t[:n].copy(),
            "row_version": self._rv[:n].copy(),
            "dedup_ids": np.array(list(self._seen), dtype=np.str_),
            "n_clusters": np.array(self.n_clusters, dtype=np.int64),
            "lam": np.array(self.lam),
            "half_life_s": np.array(self.half_life_s),
            "dedup_capacity": np.array(self.dedup_capacity, dtype=np.int64),
            "version": np.array(self.version, dtype=np.int64),
            "clock": np.array(self.clock),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DiagLinUCB:
        """Rebuild a model (or a serving view) from :meth:`to_arrays` output."""
        m = cls(
            n_clusters=int(arrays["n_clusters"]),
            lam=float(arrays["lam"]),
            half_life_s=float(arrays["half_life_s"]),
            dedup_capacity=int(arrays["dedup_capacity"]),
        )
        ids = np.asarray(arrays["item_ids"], dtype=np.int64)
        n = len(ids)
        m._grow(max(n, 16))
        m._n = n
        m._row_ids[:n] = ids
        m._d[:n] = arrays["d"]
        m._b[:n] = arrays["b"]
        m._t[:n] = arrays["t"]
        m._rv[:n] = arrays["row_version"]
        order = np.argsort(ids, kind="stable")
        m._sorted_ids = ids[order]
        m._sorted_rows = order.astype(np.int64)
        m.version = int(arrays["version"])
        m.clock = float(arrays["clock"])
        m._seen.admit([str(e) for e in arrays.get("dedup_ids", np.array([], dtype=np.str_))])
        return m

    def __len__(self) -> int:
        """Items with statistics."""
        return self._n

    def __contains__(self, item_id: int) -> bool:
        _, found = self._lookup(np.array([item_id], dtype=np.int64))
        return bool(found[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the statistics and the id index (the dedup window not included)."""
        arrays = (self._row_ids, self._d, self._b, self._t, self._rv)
        return sum(a.nbytes for a in arrays) + self._sorted_ids.nbytes + self._sorted_rows.nbytes
