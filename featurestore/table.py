"""The collisionless, expirable embedding table (Monolith's ``HashTable``, for CPU and Python).

One :class:`EmbeddingTable` per slot. Every admitted feature ID owns a row of contiguous numpy
arrays (no modulo into a fixed row count, so two IDs never share a vector):

=============  ==================  ===================================================
array          dtype / shape       why
=============  ==================  ===================================================
``row_ids``    int64 (cap,)        row -> ID, for snapshots, evictions and the index
``emb``        float32 (cap, dim)  the embeddings
optimizer      see ``optimizer``   Adagrad ``acc`` (cap, dim) or (cap,) row-wise; FTRL
                                   ``z``, ``n`` (cap, dim) each; SGD nothing
``last_seen``  float64 (cap,)      event time of the latest lookup, for TTL and LRU
``counts``     int32 (cap,)        sightings since admission (saturating)
``versions``   int64 (cap,)        version of the latest write, for incremental publish
=============  ==================  ===================================================

plus an int32 open-addressing index ID -> row (:mod:`featurestore.hashmap`), a free-row stack,
the admission state (count-min sketch or exact pending counts) and a deletion log.

Concurrency contract (be precise, it is weak on purpose): the trainer is the single writer and
the table takes no locks. Numba kernels here hold the GIL, but public methods are several
steps (a kernel, then numpy fancy-indexing, then array swaps on growth), so another thread that
calls *any* method while a mutating call (``lookup``, ``apply_gradients``, ``sweep_expired``,
``trim_deletions``) is running may see a half-applied batch, a row reused for another ID, or
arrays that are about to be replaced. Readers on other threads must therefore serialize with
the writer (one lock around every call). What they may rely on: every method that returns
arrays (``find``, ``gather``, ``changes_since``, ``all_rows``) returns fresh copies, so a
result obtained under the lock stays valid and unchanged after the lock is released.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from numba import njit

from featurestore import hashmap as hm
from featurestore import optimizers as opt
from featurestore.hashmap import EMPTY_ID
from featurestore.schema import ModelConfig, SlotConfig

FORMAT_VERSION = 1
_INITIAL_ROWS = 1024
_INT32_MAX = np.iinfo(np.int32).max

# Indices into the int64 ``_state`` vector shared with the lookup kernel.
_N_USED, _N_FREE, _LIVE, _ADMITTED, _REJECTED, _N_NEW, _PENDING = range(7)
_STATE_NAMES = ("n_used", "n_free", "live", "admitted", "rejected", "n_new", "pending")

# Why the lookup kernel stopped early (the caller grows that structure and resumes).
_DONE, _NEED_ROWS, _NEED_INDEX, _NEED_PENDING, _NEED_NEW_BUF = range(5)

Optimizer = Literal["adagrad", "ftrl", "sgd"]
Admission = Literal["sketch", "exact"]


@dataclass(frozen=True)
class TableConfig:
    """How one table behaves. Defaults match :class:`featurestore.schema.SlotConfig`.

    ``admission`` picks how not-yet-admitted IDs are counted: ``"sketch"`` (count-min, fixed
    memory, may admit a little early in count but never before ``min_count`` sightings) or
    ``"exact"`` (a hash map of pending counts: exact, but grows with every one-off ID; meant
    for tests and small slots). With ``min_count == 1`` neither exists.

    ``rowwise_adagrad`` keeps one Adagrad accumulator per row instead of per coordinate, as
    TorchRec/FBGEMM do: ``dim`` times less optimizer memory, slightly different updates.
    """

    name: str
    dim: int
    min_count: int = 1
    ttl_seconds: float = 30 * 86400.0
    max_rows: int = 10_000_000
    optimizer: Optimizer = "adagrad"
    learning_rate: float = 0.05
    init_scale: float = 0.05
    initial_accumulator: float = 1.0
    seed: int = 0
    admission: Admission = "sketch"
    rowwise_adagrad: bool = False
    ftrl_beta: float = 1.0
    ftrl_l1: float = 1e-6
    ftrl_l2: float = 1e-6
    sketch_depth: int = 4
    sketch_width: int | None = None  # None: next power of two >= min(max_rows, 2**20), >= 1024

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"{self.name}: dim must be >= 1")
        if self.min_count < 1:
            raise ValueError(f"{self.name}: min_count must be >= 1")
        if self.min_count > 65535 and self.admission == "sketch":
            raise ValueError(f"{self.name}: sketch counters saturate at 65535")
        if self.max_rows < 1 or self.max_rows > _INT32_MAX:
            raise ValueError(f"{self.name}: max_rows must be in [1, 2**31)")
        if not self.ttl_seconds > 0:
            raise ValueError(f"{self.name}: ttl_seconds must be > 0")
        if self.optimizer not in ("adagrad", "ftrl", "sgd"):
            raise ValueError(f"{self.name}: unknown optimizer {self.optimizer!r}")
        if self.admission not in ("sketch", "exact"):
            raise ValueError(f"{self.name}: unknown admission {self.admission!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"{self.name}: learning_rate must be > 0")
        w = self.sketch_width
        if w is not None and (w < 2 or w & (w - 1)):
            raise ValueError(f"{self.name}: sketch_width must be a power of two")

    @classmethod
    def from_slot(cls, slot: SlotConfig, seed: int = 0) -> TableConfig:
        """The table config of one slot of the model config."""
        return cls(
            name=slot.name,
            dim=slot.dim,
            min_count=slot.min_count,
            ttl_seconds=slot.ttl_seconds,
            max_rows=slot.max_rows,
            optimizer=str(slot.optimizer.value),  # type: ignore[arg-type]
            learning_rate=slot.learning_rate,
            init_scale=slot.init_scale,
            seed=seed,
        )

    @property
    def resolved_sketch_width(self) -> int:
        """Sketch width actually used (a power of two)."""
        if self.sketch_width is not None:
            return self.sketch_width
        return max(1024, 1 << (min(self.max_rows, 1 << 20) - 1).bit_length())


@dataclass(frozen=True)
class TableChanges:
    """What changed after a version: rows to (re)publish and IDs to delete downstream."""

    ids: np.ndarray  # int64 (k,)
    vectors: np.ndarray  # float32 (k, dim)
    deleted_ids: np.ndarray  # int64 (m,), none of them live now
    version: int  # pass this to the next changes_since call


@dataclass(frozen=True)
class TableStats:
    """Counters for metrics. ``bytes`` is the nbytes of every array the table holds."""

    rows: int
    admitted_total: int
    evicted_total: int
    rejected_total: int
    bytes: int


@njit(cache=True, nogil=True)
def _lookup_kernel(
    keys: np.ndarray,
    ts: np.ndarray,
    start: int,
    out: np.ndarray,
    index: np.ndarray,
    row_ids: np.ndarray,
    last_seen: np.ndarray,
    counts: np.ndarray,
    versions: np.ndarray,
    free_rows: np.ndarray,
    new_rows: np.ndarray,
    state: np.ndarray,
    mode: int,
    min_count: int,
    pend_keys: np.ndarray,
    pend_vals: np.ndarray,
    sketch: np.ndarray,
    version: int,
    max_index_live: int,
    max_pending: int,
) -> tuple[int, int]:
    """Training lookup from position ``start``; returns (reason, position) where it stopped.

    Stops *before* a key that needs a structure to grow, so the caller can grow and resume at
    the same position with nothing half-done. mode: 0 admit at once, 1 exact, 2 sketch.
    """
    cap = row_ids.shape[0]
    for i in range(start, keys.shape[0]):
        key = keys[i]
        t = ts[i]
        r = hm.index_find(index, row_ids, key)
        if r >= 0:
            if t > last_seen[r]:
                last_seen[r] = t
            if counts[r] < 2147483647:
                counts[r] += 1
            out[i] = r
            continue
        # Make sure every structure this key may touch has room before changing anything.
        if state[_N_FREE] == 0 and state[_N_USED] >= cap:
            return _NEED_ROWS, i
        if state[_LIVE] + 1 > max_index_live:
            return _NEED_INDEX, i
        if mode == 1 and state[_PENDING] + 1 > max_pending:
            return _NEED_PENDING, i
        if state[_N_NEW] >= new_rows.shape[0]:
            return _NEED_NEW_BUF, i
        admit = True
        if mode == 1:
            c = hm.kv_add(pend_keys, pend_vals, key, 1)
            if c == 1:
                state[_PENDING] += 1
            if c >= min_count:
                hm.kv_delete(pend_keys, pend_vals, key)
                state[_PENDING] -= 1
            else:
                admit = False
        elif mode == 2:
            admit = hm.sketch_add(sketch, key) >= min_count
        if not admit:
            out[i] = -1
            state[_REJECTED] += 1
            continue
        if state[_N_FREE] > 0:
            state[_N_FREE] -= 1
            r = free_rows[state[_N_FREE]]
        else:
            r = state[_N_USED]
            state[_N_USED] += 1
        row_ids[r] = key
        hm.index_insert(index, row_ids, key, r)
        last_seen[r] = t
        counts[r] = 1
        versions[r] = version
        new_rows[state[_N_NEW]] = r
        state[_N_NEW] += 1
        state[_LIVE] += 1
        state[_ADMITTED] += 1
        out[i] = r
    return _DONE, keys.shape[0]


@njit(cache=True, nogil=True)
def _evict_kernel(
    rows: np.ndarray,
    index: np.ndarray,
    row_ids: np.ndarray,
    free_rows: np.ndarray,
    state: np.ndarray,
) -> np.ndarray:
    """Free ``rows`` (live, distinct): drop from the index, push on the free stack; their IDs."""
    out = np.empty(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        r = rows[i]
        key = row_ids[r]
        out[i] = key
        hm.index_delete(index, row_ids, key)
        row_ids[r] = EMPTY_ID
        free_rows[state[_N_FREE]] = r
        state[_N_FREE] += 1
        state[_LIVE] -= 1
    return out


def _load_malloc_trim():  # returns a ctypes function, or None off glibc
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_freed_memory() -> None:
    """Hand the arrays replaced by a growth step back to the OS.

    Arrays under glibc's (adaptive, up to 32 MB) mmap threshold come from the heap, and a
    freed old copy there stays resident: measured +20 bytes per live ID at 1 M rows.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _pow2_at_least(n: int) -> int:
    return 1 << max(4, (int(n) - 1).bit_length())


@dataclass
class _DeletionLog:
    """Evicted IDs in chunks, one chunk per evicting call, each tagged with its version."""

    ids: list[np.ndarray] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    trimmed_upto: int = 0

    def since(self, version: int) -> np.ndarray:
        parts = [c for c, v in zip(self.ids, self.versions, strict=True) if v > version]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


class EmbeddingTable:
    """A collisionless, expirable embedding table for one slot (see the module docstring).

    Example:
        >>> t = EmbeddingTable(TableConfig("item", dim=4, optimizer="sgd", learning_rate=1.0))
        >>> rows = t.lookup(np.array([7, 8, 7]), ts=100.0)
        >>> rows.tolist(), len(t)
        ([0, 1, 0], 2)
        >>> t.apply_gradients(rows, np.ones((3, 4), np.float32))
        >>> bool(np.allclose(t.gather(rows[:1])[0], t.initial_vectors(np.array([7]))[0] - 2))
        True
    """

    def __init__(self, config: TableConfig) -> None:
        self.config = config
        self.version = 0
        self._state = np.zeros(7, dtype=np.int64)
        self._mode = 0 if config.min_count <= 1 else (1 if config.admission == "exact" else 2)
        self._evicted_total = 0
        self._deletions = _DeletionLog()
        cap = _INITIAL_ROWS
        self._rows: dict[str, np.ndarray] = self._alloc_rows(cap)
        self._index = np.full(_pow2_at_least(cap / hm.MAX_LOAD), -1, dtype=np.int32)
        self._free = np.empty(16, dtype=np.int64)
        self._new_rows = np.empty(1024, dtype=np.int64)
        if self._mode == 1:
            self._pend_keys = np.full(1024, EMPTY_ID, dtype=np.int64)
            self._pend_vals = np.zeros(1024, dtype=np.int64)
        else:
            self._pend_keys = np.full(1, EMPTY_ID, dtype=np.int64)
            self._pend_vals = np.zeros(1, dtype=np.int64)
        if self._mode == 2:
            shape = (config.sketch_depth, config.resolved_sketch_width)
            self._sketch = np.zeros(shape, dtype=np.uint16)
        else:
            self._sketch = np.zeros((1, 1), dtype=np.uint16)

    # ---- storage ---------------------------------------------------------------------------

    def _row_specs(self) -> dict[str, tuple[tuple[int, ...], type]]:
        c = self.config
        specs: dict[str, tuple[tuple[int, ...], type]] = {
            "row_ids": ((), np.int64),
            "emb": ((c.dim,), np.float32),
            "last_seen": ((), np.float64),
            "counts": ((), np.int32),
            "versions": ((), np.int64),
        }
        if c.optimizer == "adagrad":
            specs["acc"] = (() if c.rowwise_adagrad else (c.dim,), np.float32)
        elif c.optimizer == "ftrl":
            specs["ftrl_z"] = ((c.dim,), np.float32)
            specs["ftrl_n"] = ((c.dim,), np.float32)
        return specs

    def _alloc_rows(self, cap: int) -> dict[str, np.ndarray]:
        # np.empty: pages beyond the rows in use are never touched, so the OS never backs them.
        return {
            k: np.empty((cap, *shape), dtype=dt) for k, (shape, dt) in self._row_specs().items()
        }

    @property
    def capacity(self) -> int:
        """Rows allocated (live + free + never used)."""
        return self._rows["row_ids"].shape[0]

    def _grow_rows(self, at_least: int = 0) -> None:
        # Doubling: amortized O(1) per insert; the worst single call copies every used row once.
        n_used = int(self._state[_N_USED])
        cap = self.capacity * 2
        while cap < at_least:
            cap *= 2
        new = self._alloc_rows(cap)
        for k, a in self._rows.items():
            new[k][:n_used] = a[:n_used]
        self._rows = new
        _release_freed_memory()

    def _grow_index(self, live_needed: int) -> None:
        self._index = np.full(_pow2_at_least(live_needed / hm.MAX_LOAD), -1, dtype=np.int32)
        hm.index_rebuild(self._index, self._rows["row_ids"], int(self._state[_N_USED]))
        _release_freed_memory()

    def _grow_pending(self) -> None:
        keys = np.full(self._pend_keys.shape[0] * 2, EMPTY_ID, dtype=np.int64)
        vals = np.zeros(keys.shape[0], dtype=np.int64)
        hm.kv_rehash(self._pend_keys, self._pend_vals, keys, vals)
        self._pend_keys, self._pend_vals = keys, vals

    def _reset_rows(self, rows: np.ndarray) -> None:
        """Fresh embedding and optimizer state for newly created (possibly reused) rows."""
        c, a = self.config, self._rows
        if c.optimizer == "ftrl":
            w = self.initial_vectors(a["row_ids"][rows])
            a["emb"][rows] = w
            a["ftrl_n"][rows] = np.float32(c.initial_accumulator)
            a["ftrl_z"][rows] = opt.ftrl_z_for_weights(
                w, c.initial_accumulator, c.learning_rate, c.ftrl_beta, c.ftrl_l1, c.ftrl_l2
            )
            return
        acc = a["acc"] if c.optimizer == "adagrad" else np.empty(0, np.float32)
        hm.init_rows(rows, a["row_ids"], a["emb"], acc, c.initial_accumulator, c.init_scale, c.seed)

    # ---- public API --------------------------------------------------------------------------

    def reserve(self, rows: int) -> None:
        """Allocate and pre-fault room for ``rows`` live rows now rather than mid-training.

        Growth otherwise happens inside :meth:`lookup`: a doubling copy plus the kernel
        zero-filling fresh pages, which on the benchmark VM runs at only ~0.4 GB/s and so
        dominates insert cost (see docs/embedding-table.md). Reserving trades that for RSS
        held up front.
        """
        rows = min(int(rows), self.config.max_rows + 65536)
        if rows > self.capacity:
            self._grow_rows(rows)
        n_used = int(self._state[_N_USED])
        for a in self._rows.values():
            a[n_used:rows] = 0  # touch the pages so the OS backs them now
        if rows > self._index.shape[0] * hm.MAX_LOAD:
            self._grow_index(rows)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels of admission, row creation, index
        growth, changes and expiry on a scratch table of this config. Without this, a fresh
        install compiles them inside the first batches that create rows or grow the index
        (seconds on the trainer's first batches). This table is left as it was."""
        scratch = EmbeddingTable(self.config)
        ids = np.arange(1, 3, dtype=np.int64)
        for _ in range(max(1, self.config.min_count)):
            scratch.lookup(ids, 0.0)
        scratch.reserve(int(scratch._index.shape[0] * hm.MAX_LOAD) + 1)
        scratch.gather(scratch.find(ids))
        scratch.changes_since(0)
        scratch.sweep_expired(self.config.ttl_seconds + 1.0)

    def initial_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The vectors a row starts (and restarts after reuse) with: Uniform(±init_scale).

        A pure function of (seed, ID), so tests and replicas can reproduce initialization.
        """
        c = self.config
        return hm.init_vectors(np.asarray(ids, dtype=np.int64), c.dim, c.init_scale, c.seed)

    def lookup(self, ids: np.ndarray, ts: float | np.ndarray) -> np.ndarray:
        """Training-path lookup: count, admit, create rows, refresh last-seen; rows or -1.

        IDs are handled in order, so an ID reaching ``min_count`` mid-batch gets a row from
        that position on. ``last_seen`` becomes ``max(old, ts)`` (event time may arrive out of
        order). If the batch leaves more than ``max_rows`` live rows, the least-recently-seen
        rows (ties: smaller ID first) are evicted at the end of the call, which may include
        rows created by this very batch; their positions then read -1.
        """
        keys = np.ascontiguousarray(ids, dtype=np.int64)
        if keys.ndim != 1:
            raise ValueError("ids must be 1-D")
        if keys.size and (keys == EMPTY_ID).any():
            raise ValueError("int64 min is reserved as the empty-row sentinel")
        t = np.broadcast_to(np.asarray(ts, dtype=np.float64), keys.shape)
        t = np.ascontiguousarray(t)
        self.version += 1
        out = np.empty(keys.shape[0], dtype=np.int64)
        self._state[_N_NEW] = 0
        pos = 0
        c = self.config
        while True:
            rows = self._rows
            reason, pos = _lookup_kernel(
                keys, t, pos, out, self._index, rows["row_ids"], rows["last_seen"],
                rows["counts"], rows["versions"], self._free, self._new_rows, self._state,
                self._mode, c.min_count, self._pend_keys, self._pend_vals, self._sketch,
                self.version, int(self._index.shape[0] * hm.MAX_LOAD),
                int(self._pend_keys.shape[0] * hm.MAX_LOAD),
            )  # fmt: skip
            if reason == _DONE:
                break
            if reason == _NEED_ROWS:
                self._grow_rows()
            elif reason == _NEED_INDEX:
                self._grow_index(int(self._state[_LIVE]) + 1)
            elif reason == _NEED_PENDING:
                self._grow_pending()
            else:
                bigger = np.empty(self._new_rows.shape[0] * 2, dtype=np.int64)
                bigger[: self._new_rows.shape[0]] = self._new_rows
                self._new_rows = bigger
        n_new = int(self._state[_N_NEW])
        if n_new:
            self._reset_rows(self._new_rows[:n_new])
        excess = int(self._state[_LIVE]) - c.max_rows
        if excess > 0:
            victims = self._least_recently_seen(excess)
            self._evict(victims)
            out[np.isin(out, victims)] = -1
        return out

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Read-only lookup: rows, -1 where absent. No counting, no side effects."""
        keys = np.ascontiguousarray(ids, dtype=np.int64)
        return hm.find_many(self._index, self._rows["row_ids"], keys)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """float32 (n, dim) embeddings of ``rows``; zeros where the row is -1."""
        rows = np.asarray(rows, dtype=np.int64)
        out = self._rows["emb"][np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out

    def apply_gradients(self, rows: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step per unique row on the summed gradients; -1 rows are dropped."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        grads = np.ascontiguousarray(grads, dtype=np.float32)
        if grads.shape != (rows.shape[0], self.config.dim):
            raise ValueError(f"grads shape {grads.shape} != ({rows.shape[0]}, {self.config.dim})")
        uniq, summed = opt.sum_by_row(rows, grads)
        if uniq.size == 0:
            return
        self.version += 1
        c, a = self.config, self._rows
        if c.optimizer == "sgd":
            opt.sgd_step(a["emb"], uniq, summed, c.learning_rate)
        elif c.optimizer == "adagrad" and c.rowwise_adagrad:
            opt.rowwise_adagrad_step(a["emb"], a["acc"], uniq, summed, c.learning_rate)
        elif c.optimizer == "adagrad":
            opt.adagrad_step(a["emb"], a["acc"], uniq, summed, c.learning_rate)
        else:
            opt.ftrl_step(
                a["emb"], a["ftrl_z"], a["ftrl_n"], uniq, summed,
                c.learning_rate, c.ftrl_beta, c.ftrl_l1, c.ftrl_l2,
            )  # fmt: skip
        a["versions"][uniq] = self.version

    @property
    def optimizer_code(self) -> int:
        """The optimizer as a kernel code (``featurestore.optimizers.SGD/ADAGRAD/FTRL``)."""
        c = self.config
        if c.optimizer == "adagrad" and c.rowwise_adagrad:
            raise ValueError(f"{c.name}: row-wise Adagrad has no per-coordinate kernel")
        return {"sgd": opt.SGD, "adagrad": opt.ADAGRAD, "ftrl": opt.FTRL}[c.optimizer]

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of ``(emb, state1, state2)`` at ``rows`` (live, distinct) for a working set.

        ``state1``/``state2``: Adagrad ``acc`` and zeros, FTRL ``z`` and ``n``, SGD zeros
        (the layout of :func:`featurestore.optimizers.update_coord`).
        """
        a = self._rows
        emb = a["emb"][rows]
        if self.config.optimizer == "ftrl":
            return emb, a["ftrl_z"][rows], a["ftrl_n"][rows]
        s1 = a["acc"][rows] if self.config.optimizer == "adagrad" else np.zeros_like(emb)
        return emb, s1, np.zeros_like(emb)

    def write_rows(self, rows: np.ndarray, emb: np.ndarray, s1: np.ndarray,
                   s2: np.ndarray) -> None:
        """Store a working set learned elsewhere back into ``rows`` (inverse of
        :meth:`read_rows`); the rows count as written now (they publish with the next delta)."""
        if not len(rows):
            return
        self.version += 1
        a = self._rows
        a["emb"][rows] = emb
        if self.config.optimizer == "ftrl":
            a["ftrl_z"][rows] = s1
            a["ftrl_n"][rows] = s2
        elif self.config.optimizer == "adagrad":
            a["acc"][rows] = s1
        a["versions"][rows] = self.version

    def sweep_expired(self, now: float) -> np.ndarray:
        """Evict rows whose last-seen event time is older than ``now - ttl``; their IDs."""
        n_used = int(self._state[_N_USED])
        ids = self._rows["row_ids"][:n_used]
        expired = (ids != EMPTY_ID) & (
            self._rows["last_seen"][:n_used] < now - self.config.ttl_seconds
        )
        victims = np.flatnonzero(expired)
        if victims.size == 0:
            return np.empty(0, dtype=np.int64)
        self.version += 1
        return self._evict(victims)

    def last_seen_times(self) -> np.ndarray:
        """Last-seen event time of every live row (a copy): what a sweep would compare."""
        n_used = int(self._state[_N_USED])
        live = self._rows["row_ids"][:n_used] != EMPTY_ID
        return self._rows["last_seen"][:n_used][live].copy()

    def changes_since(self, version: int) -> TableChanges:
        """Rows written after ``version`` and IDs deleted after it (and not live again)."""
        if version < self._deletions.trimmed_upto:
            raise ValueError(
                f"deletions up to version {self._deletions.trimmed_upto} were trimmed; "
                f"publish a full snapshot instead of changes since {version}"
            )
        n_used = int(self._state[_N_USED])
        a = self._rows
        rows = np.flatnonzero(
            (a["row_ids"][:n_used] != EMPTY_ID) & (a["versions"][:n_used] > version)
        )
        deleted = np.unique(self._deletions.since(version))
        if deleted.size:
            deleted = deleted[self.find(deleted) < 0]
        return TableChanges(a["row_ids"][rows], a["emb"][rows], deleted, self.version)

    def trim_deletions(self, upto_version: int) -> None:
        """Forget deletions at or before ``upto_version`` (everyone has published past it)."""
        log = self._deletions
        keep = [i for i, v in enumerate(log.versions) if v > upto_version]
        log.ids = [log.ids[i] for i in keep]
        log.versions = [log.versions[i] for i in keep]
        log.trimmed_upto = max(log.trimmed_upto, upto_version)

    def all_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (ID, vector), in row order: a full snapshot."""
        n_used = int(self._state[_N_USED])
        rows = np.flatnonzero(self._rows["row_ids"][:n_used] != EMPTY_ID)
        return self._rows["row_ids"][rows], self._rows["emb"][rows]

    def row_state(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of every per-row array at ``rows`` (optimizer state, times, counts...)."""
        rows = np.asarray(rows, dtype=np.int64)
        return {k: a[rows] for k, a in self._rows.items()}

    def __len__(self) -> int:
        return int(self._state[_LIVE])

    def stats(self) -> TableStats:
        """Row count, lifetime counters and the bytes of every array held."""
        arrays = [*self._rows.values(), self._index, self._free, self._new_rows,
                  self._pend_keys, self._pend_vals, self._sketch]  # fmt: skip
        return TableStats(
            rows=len(self),
            admitted_total=int(self._state[_ADMITTED]),
            evicted_total=self._evicted_total,
            rejected_total=int(self._state[_REJECTED]),
            bytes=int(sum(a.nbytes for a in arrays)) + sum(c.nbytes for c in self._deletions.ids),
        )

    # ---- eviction ----------------------------------------------------------------------------

    def _least_recently_seen(self, k: int) -> np.ndarray:
        """The ``k`` live rows with the smallest (last_seen, ID), exactly."""
        n_used = int(self._state[_N_USED])
        ids = self._rows["row_ids"][:n_used]
        live = np.flatnonzero(ids != EMPTY_ID)
        seen = self._rows["last_seen"][live]
        if k >= live.size:
            return live
        kth = np.partition(seen, k - 1)[k - 1]
        below = live[seen < kth]
        tied = live[seen == kth]
        tied = tied[np.argsort(ids[tied], kind="stable")][: k - below.size]
        return np.concatenate([below, tied])

    def _evict(self, rows: np.ndarray) -> np.ndarray:
        need = int(self._state[_N_FREE]) + rows.size
        if need > self._free.shape[0]:
            bigger = np.empty(_pow2_at_least(need), dtype=np.int64)
            bigger[: self._free.shape[0]] = self._free
            self._free = bigger
        evicted = _evict_kernel(
            np.ascontiguousarray(rows, dtype=np.int64), self._index, self._rows["row_ids"],
            self._free, self._state,
        )  # fmt: skip
        self._evicted_total += int(evicted.size)
        self._deletions.ids.append(evicted)
        self._deletions.versions.append(self.version)
        return evicted

    # ---- persistence -------------------------------------------------------------------------

    def save(self, directory: Path | str) -> None:
        """Write raw .npy arrays (no pickle) and ``meta.json``; :meth:`load` is bit-exact."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        n_used = int(self._state[_N_USED])
        arrays = {f"row_{k}": a[:n_used] for k, a in self._rows.items()}
        arrays |= {
            "index": self._index,
            "free": self._free[: int(self._state[_N_FREE])],
            "pend_keys": self._pend_keys,
            "pend_vals": self._pend_vals,
            "sketch": self._sketch,
            "state": self._state,
        }
        for i, chunk in enumerate(self._deletions.ids):
            arrays[f"deleted_{i}"] = chunk
        for name, a in arrays.items():
            np.save(d / f"{name}.npy", a, allow_pickle=False)
        meta = {
            "format": FORMAT_VERSION,
            "config": asdict(self.config),
            "version": self.version,
            "capacity": self.capacity,
            "free_capacity": self._free.shape[0],
            "new_rows_capacity": self._new_rows.shape[0],
            "evicted_total": self._evicted_total,
            "deletion_versions": self._deletions.versions,
            "deletions_trimmed_upto": self._deletions.trimmed_upto,
        }
        (d / "meta.json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path | str) -> EmbeddingTable:
        """Read a table written by :meth:`save`."""
        d = Path(directory)
        meta = json.loads((d / "meta.json").read_text())
        if meta["format"] != FORMAT_VERSION:
            raise ValueError(f"{d}: table format {meta['format']}, expected {FORMAT_VERSION}")

        def arr(name: str) -> np.ndarray:
            return np.load(d / f"{name}.npy", allow_pickle=False)

        t = cls(TableConfig(**meta["config"]))
        t.version = meta["version"]
        t._evicted_total = meta["evicted_total"]
        t._state = arr("state")
        n_used = int(t._state[_N_USED])
        t._rows = t._alloc_rows(max(meta["capacity"], _INITIAL_ROWS))
        for k in t._rows:
            t._rows[k][:n_used] = arr(f"row_{k}")
        t._index = arr("index")
        free = arr("free")
        t._free = np.empty(meta["free_capacity"], dtype=np.int64)
        t._new_rows = np.empty(meta["new_rows_capacity"], dtype=np.int64)
        t._free[: free.size] = free
        t._pend_keys, t._pend_vals, t._sketch = arr("pend_keys"), arr("pend_vals"), arr("sketch")
        versions = meta["deletion_versions"]
        t._deletions = _DeletionLog(
            [arr(f"deleted_{i}") for i in range(len(versions))], versions,
            meta["deletions_trimmed_upto"],
        )  # fmt: skip
        return t


class TableSet(Mapping[str, EmbeddingTable]):
    """One :class:`EmbeddingTable` per slot of a model config; ``tables[slot_name]``."""

    def __init__(self, tables: Mapping[str, EmbeddingTable]) -> None:
        self._tables = dict(tables)

    @classmethod
    def from_model_config(cls, config: ModelConfig, seed: int = 0) -> TableSet:
        """Fresh empty tables. Each slot's seed is derived from ``seed`` and its position."""
        return cls(
            {
                s.name: EmbeddingTable(TableConfig.from_slot(s, seed + i))
                for i, s in enumerate(config.slots)
            }
        )

    def __getitem__(self, name: str) -> EmbeddingTable:
        return self._tables[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def save(self, directory: Path | str) -> None:
        """Each table under ``directory/<slot>/`` plus ``tables.json`` naming them."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, table in self._tables.items():
            table.save(d / name)
        (d / "tables.json").write_text(json.dumps({"slots": list(self._tables)}))

    @classmethod
    def load(cls, directory: Path | str, config: ModelConfig) -> TableSet:
        """Load the tables of ``config``; refuse if a slot is missing or its dim changed."""
        d = Path(directory)
        saved = set(json.loads((d / "tables.json").read_text())["slots"])
        tables = {}
        for slot in config.slots:
            if slot.name not in saved:
                raise ValueError(f"{d}: no saved table for slot {slot.name!r}")
            t = EmbeddingTable.load(d / slot.name)
            if t.config.dim != slot.dim:
                raise ValueError(
                    f"{d}: slot {slot.name!r} has dim {t.config.dim}, config {slot.dim}"
                )
            tables[slot.name] = t
        return cls(tables)

    def sweep_expired(self, now: float) -> dict[str, np.ndarray]:
        """Expire every table at event time ``now``; evicted IDs per slot."""
        return {name: t.sweep_expired(now) for name, t in self._tables.items()}

    def stats(self) -> dict[str, TableStats]:
        """Stats per slot."""
        return {name: t.stats() for name, t in self._tables.items()}


__all__ = ["EmbeddingTable", "TableChanges", "TableConfig", "TableSet", "TableStats"]
