"""Numba kernels for the embedding table: an open-addressing ID -> row index and its helpers.

The index stores only ``int32`` row numbers (``-1`` = empty slot); the key of a slot is read
back from the table's ``row_ids`` array. That keeps each key in memory once (the table needs the
row -> ID array anyway, for snapshots and evictions), so the index costs 4 bytes per slot, about
8 bytes per live ID at the load factors used (0.25-0.5), instead of 24+ for a key/value table.
Linear probing with backward-shift deletion: no tombstones, so probe lengths never degrade
after many evictions.

Everything here is ``@njit(cache=True)`` and works on arrays owned by
:class:`featurestore.table.EmbeddingTable`; nothing here allocates per key.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY_ID = np.iinfo(np.int64).min  # row_ids value of a free row; never a valid feature ID
MAX_LOAD = 0.5  # index is rebuilt at twice the size when live / slots would exceed this

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def mix64(key: int) -> np.uint64:
    """splitmix64 finalizer: sequential or structured IDs spread over all slots."""
    z = np.uint64(key) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def index_find(index: np.ndarray, row_ids: np.ndarray, key: int) -> int:
    """The row of ``key``, or -1."""
    mask = np.uint64(index.shape[0] - 1)
    slot = mix64(key) & mask
    while True:
        r = index[slot]
        if r < 0:
            return -1
        if row_ids[r] == key:
            return r
        slot = (slot + np.uint64(1)) & mask


@njit(cache=True, nogil=True)
def index_insert(index: np.ndarray, row_ids: np.ndarray, key: int, row: int) -> None:
    """Put ``key -> row``; the caller guarantees ``key`` is absent and a slot is free."""
    mask = np.uint64(index.shape[0] - 1)
    slot = mix64(key) & mask
    while index[slot] >= 0:
        slot = (slot + np.uint64(1)) & mask
    index[slot] = row


@njit(cache=True, nogil=True)
def index_delete(index: np.ndarray, row_ids: np.ndarray, key: int) -> None:
    """Remove ``key`` (must be present) by backward-shift deletion (Knuth 6.4 algorithm R)."""
    cap = index.shape[0]
    mask = np.uint64(cap - 1)
    slot = mix64(key) & mask
    while row_ids[index[slot]] != key:
        slot = (slot + np.uint64(1)) & mask
    hole = np.int64(slot)
    j = hole
    while True:
        j = (j + 1) & (cap - 1)
        r = index[j]
        if r < 0:
            break
        home = np.int64(mix64(row_ids[r]) & mask)
        # Move r into the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and home <= hole and home > j):
            index[hole] = r
            hole = j
    index[hole] = -1


@njit(cache=True, nogil=True)
def index_rebuild(index: np.ndarray, row_ids: np.ndarray, n_used: int) -> None:
    """Fill an all-empty ``index`` with every live row in ``row_ids[:n_used]``."""
    for r in range(n_used):
        k = row_ids[r]
        if k != EMPTY_ID:
            index_insert(index, row_ids, k, r)


@njit(cache=True, nogil=True)
def find_many(index: np.ndarray, row_ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Rows of ``keys`` (-1 where absent). Read-only."""
    out = np.empty(keys.shape[0], dtype=np.int64)
    for i in range(keys.shape[0]):
        out[i] = index_find(index, row_ids, keys[i])
    return out


@njit(cache=True, nogil=True)
def unique_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniq, local)``: the distinct non-negative rows in first-occurrence order, and for each
    entry its position in ``uniq`` (-1 where the row is -1).

    A scratch open-addressing map sized for this call does the grouping: O(n), nothing kept.
    """
    n = rows.shape[0]
    cap = 16
    while cap < 2 * n:
        cap *= 2
    slot_rows = np.full(cap, -1, dtype=np.int64)
    slot_pos = np.empty(cap, dtype=np.int64)
    uniq = np.empty(n, dtype=np.int64)
    local = np.empty(n, dtype=np.int64)
    k = 0
    mask = cap - 1
    for i in range(n):
        r = rows[i]
        if r < 0:
            local[i] = -1
            continue
        s = (r * 0x9E3779B1) & mask
        while slot_rows[s] != -1 and slot_rows[s] != r:
            s = (s + 1) & mask
        if slot_rows[s] == -1:
            slot_rows[s] = r
            slot_pos[s] = k
            uniq[k] = r
            k += 1
        local[i] = slot_pos[s]
    return uniq[:k], local


# --- exact pending counts (admission='exact'): int64 key -> int64 count, same probing scheme --


@njit(cache=True, nogil=True)
def kv_add(keys: np.ndarray, vals: np.ndarray, key: int, delta: int) -> int:
    """Add ``delta`` to the count of ``key`` (inserting it at 0) and return the new count."""
    mask = np.uint64(keys.shape[0] - 1)
    slot = mix64(key) & mask
    while True:
        k = keys[slot]
        if k == key:
            vals[slot] += delta
            return vals[slot]
        if k == EMPTY_ID:
            keys[slot] = key
            vals[slot] = delta
            return delta
        slot = (slot + np.uint64(1)) & mask


@njit(cache=True, nogil=True)
def kv_delete(keys: np.ndarray, vals: np.ndarray, key: int) -> bool:
    """Remove ``key`` if present (backward shift); True if it was there."""
    cap = keys.shape[0]
    mask = np.uint64(cap - 1)
    slot = mix64(key) & mask
    while keys[slot] != key:
        if keys[slot] == EMPTY_ID:
            return False
        slot = (slot + np.uint64(1)) & mask
    hole = np.int64(slot)
    j = hole
    while True:
        j = (j + 1) & (cap - 1)
        k = keys[j]
        if k == EMPTY_ID:
            break
        home = np.int64(mix64(k) & mask)
        if (j > hole and (home <= hole or home > j)) or (j < hole and home <= hole and home > j):
            keys[hole] = k
            vals[hole] = vals[j]
            hole = j
    keys[hole] = EMPTY_ID
    vals[hole] = 0
    return True


@njit(cache=True, nogil=True)
def kv_rehash(old_keys: np.ndarray, old_vals: np.ndarray, keys: np.ndarray, vals: np.ndarray):
    """Copy every entry of the old map into the (empty, larger) new one."""
    for i in range(old_keys.shape[0]):
        if old_keys[i] != EMPTY_ID:
            kv_add(keys, vals, old_keys[i], old_vals[i])


# --- count-min sketch with conservative update ------------------------------------------------


@njit(cache=True, inline="always")
def sketch_add(sketch: np.ndarray, key: int) -> int:
    """Count one sighting of ``key``; return its new estimate (never below the true count).

    Conservative update raises only the counters that equal the current minimum, which keeps
    overestimates small; uint16 counters saturate instead of wrapping.
    """
    depth, width = sketch.shape
    mask = np.uint64(width - 1)
    h = mix64(key)
    est = 65535
    for d in range(depth):
        c = np.int64(sketch[d, h & mask])
        if c < est:
            est = c
        h = mix64(np.int64(h))  # an independent hash per sketch row
    new = est + 1 if est < 65535 else est
    h = mix64(key)
    for d in range(depth):
        s = h & mask
        if sketch[d, s] < new:
            sketch[d, s] = new
        h = mix64(np.int64(h))
    return new


# --- deterministic initialization -------------------------------------------------------------


@njit(cache=True, inline="always")
def _init_one(out: np.ndarray, i: int, key: int, dim: int, scale: float, s: np.uint64) -> None:
    base = mix64(key) ^ s
    for j in range(dim):
        z = mix64(np.int64(base + np.uint64(j) * _GOLDEN))
        u = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)  # [0, 1)
        out[i, j] = np.float32(scale * (2.0 * u - 1.0))


@njit(cache=True, nogil=True)
def init_vectors(keys: np.ndarray, dim: int, scale: float, seed: int) -> np.ndarray:
    """Uniform(-scale, scale) vectors that are a pure function of (seed, key, coordinate).

    Counter-based rather than a stream RNG: a reference model (or a replica) reproduces a row's
    initial value from its ID alone, and no RNG state has to be saved.
    """
    out = np.empty((keys.shape[0], dim), dtype=np.float32)
    s = mix64(seed)
    for i in range(keys.shape[0]):
        _init_one(out, i, keys[i], dim, scale, s)
    return out


@njit(cache=True, nogil=True)
def init_rows(
    rows: np.ndarray,
    row_ids: np.ndarray,
    emb: np.ndarray,
    acc: np.ndarray,
    acc0: float,
    scale: float,
    seed: int,
) -> None:
    """In place: ``emb[r] = init_vectors(row_ids[r])`` and every ``acc`` entry of r = acc0.

    ``acc`` is 1-D (row-wise) or 2-D; pass a (0,) array when there is no accumulator.
    """
    s = mix64(seed)
    dim = emb.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        _init_one(emb, r, row_ids[r], dim, scale, s)
    if acc.shape[0] > 0:
        flat = acc.reshape(acc.shape[0], -1)
        for i in range(rows.shape[0]):
            flat[rows[i], :] = acc0
