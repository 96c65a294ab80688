"""The snapshot publisher: pushes what the trainer changed to Redis without ever blocking training.

Two sides. The *training thread* gathers (:meth:`Publisher.maybe_publish` after each batch,
every ``trainer_publish_interval_ms``): the embedding tables have one writer and no locks, so
reading their changes is done there, and every gathered array is a copy. The *publisher thread*
writes to Redis. Between them a bounded queue (``trainer_publish_queue_size``); when it is full
the training thread skips the cycle — nothing is lost, the changes stay in the tables (their
row versions and deletion logs) and the next gather picks them up.

While Redis is away the publisher thread keeps draining the queue and merges every delta into
one pending delta (:func:`featurestore.snapshot_merge.merge_deltas`: touched rows unioned,
upserts and deletions resolved by last write), retrying with capped backoff. Memory is bounded:
past ``trainer_publish_max_pending_rows`` the merged delta is dropped and, once Redis answers
again, the training thread is asked for a full snapshot instead (as when Redis comes back
empty, another publisher replaced the generation, or a checkpoint restore swapped the tables).
A full snapshot takes the publisher thread about a second per 100 k rows of Python work, which
then competes with training for the GIL; gathering it costs the training thread one copy of the
live rows.

Per write: one cheap ``HGET meta generation`` detects a flushed/restarted Redis (or another
publisher); otherwise the merged delta — rows, deleted IDs, changed bandit rows, and every
``trainer_dense_publish_interval_s`` when they changed the dense weights and user-cluster
centroids — goes out as one transaction. A failed write is retried merged with what came after;
its version number is burnt, so replicas see a gap in the ``prev_version`` chain and reload
fully rather than miss anything.

``background=False`` (tests, tools) runs the same machinery inline: ``maybe_publish`` returns
once Redis confirmed (or refused) the write.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from bandit.diag_linucb import DiagLinUCB
from featurestore.schema import ModelConfig
from featurestore.snapshot_buckets import BucketedStore
from featurestore.snapshot_merge import merge_deltas, pending_rows
from featurestore.snapshot_types import BanditHeader, BanditRows, SnapshotData
from featurestore.snapshot_writer import SnapshotStore
from featurestore.table import TableSet
from freshrec.metrics import TrainerMetrics
from freshrec.redis_client import REDIS_UNAVAILABLE, redis_client
from freshrec.settings import Settings
from trainer.model import CTRModel, model_arrays

if TYPE_CHECKING:
    from trainer.loop import Trainer
    from trainer.sharded import Ranks

log = logging.getLogger("freshrec.publisher")

Centroids = tuple[np.ndarray, np.ndarray]  # (float32 (C, dim) centres, int64 (C,) counts)


class StateSource(Protocol):
    """What the publisher reads; attributes are read afresh every cycle (restores swap them)."""

    config: ModelConfig

    @property
    def tables(self) -> TableSet: ...
    @property
    def model(self) -> CTRModel: ...
    @property
    def bandit(self) -> DiagLinUCB | None: ...
    def centroids(self) -> Centroids | None: ...


def _no_centroids() -> Centroids | None:
    return None


@dataclass
class PublishableState:
    """The trainer state that a snapshot is made of.

    ``centroids`` is a callable because the clusters object may be replaced (checkpoint
    restore) and because "no centroids yet" (None) is a normal state early in a stream.
    """

    config: ModelConfig
    tables: TableSet
    model: CTRModel
    bandit: DiagLinUCB | None = None
    centroids: Callable[[], Centroids | None] = field(default=_no_centroids)


class _TrainerState:
    """A live view of a :class:`trainer.loop.Trainer` (its learner and exploration hook)."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self.config = trainer.config

    def _hook(self) -> Any:
        return next((h for h in self._trainer.hooks if hasattr(h, "bandit")), None)

    @property
    def tables(self) -> TableSet:
        return self._trainer.learner.tables

    @property
    def model(self) -> CTRModel:
        return self._trainer.learner.model

    @property
    def bandit(self) -> DiagLinUCB | None:
        hook = self._hook()
        return hook.bandit if hook is not None else None

    def centroids(self) -> Centroids | None:
        hook = self._hook()
        if hook is None or not hook.clusters.n_initialized:
            return None
        return hook.clusters.centroids, hook.clusters.counts


_STOP = "stop"


class Publisher:
    """Publishes full snapshots and deltas of a trainer's state to a :class:`SnapshotStore`."""

    def __init__(self, store: SnapshotStore | BucketedStore, state: StateSource | PublishableState,
                 settings: Settings, metrics: TrainerMetrics | None = None, *,
                 background: bool = False) -> None:
        self.store = store
        self.state = state
        self.metrics = metrics or TrainerMetrics()
        self.interval_s = settings.trainer_publish_interval_ms / 1000.0
        self.dense_interval_s = settings.trainer_dense_publish_interval_s
        self.max_pending_rows = settings.trainer_publish_max_pending_rows
        self.image_interval_s = settings.trainer_snapshot_image_interval_s
        # -- the training thread's side: what has been gathered --
        self._gathered_full = False
        self._table_versions: dict[str, int] = {}
        self._table_ids: dict[str, int] = {}  # id() of each table, to notice restores
        self._bandit_version = 0
        self._bandit_id = 0
        self._last_cycle = -np.inf
        self._last_dense = -np.inf
        self._last_dense_arrays: dict[str, np.ndarray] | None = None
        self._last_centroids: Centroids | None = None
        self._last_image = -np.inf
        self._imaged: tuple[Any, ...] | None = None  # table/bandit versions of the last image
        self._want_full = threading.Event()  # set by the writer: gather a full snapshot next
        # -- the writer's side: what Redis has, and what waits for it --
        self.version = 0  # last version number used (confirmed or not)
        self.confirmed_version = 0  # last version Redis acknowledged
        self.generation: str | None = None
        self.dense_version = 0
        self.centroids_version = 0
        self._full: SnapshotData | None = None
        self._delta: SnapshotData | None = None
        self._need_full = False
        self._last_error_log = -np.inf
        self.errors = 0
        self._queue: queue.Queue[tuple[str, SnapshotData | None]] | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(settings.trainer_publish_queue_size)
            self._thread = threading.Thread(target=self._run, name="snapshot-publisher",
                                            daemon=True)
            self._thread.start()

    # ---- the training thread's entry points -----------------------------------------------

    def due(self, now: float | None = None) -> bool:
        """Whether :meth:`maybe_publish` at ``now`` would gather (the interval elapsed)."""
        return (time.monotonic() if now is None else now) - self._last_cycle >= self.interval_s

    def maybe_publish(self, now: float | None = None) -> bool:
        """Gather and hand over changes if the interval elapsed; never blocks on Redis.

        True if something was handed to the publisher thread (background) or written to Redis
        (inline). Redis errors are never raised: they are logged, counted, and retried.
        """
        now = time.monotonic() if now is None else now
        if not self.due(now):
            return False
        self._last_cycle = now
        if self._queue is not None and self._queue.full():
            self.metrics.publish_skipped.inc()  # the changes wait in the tables
            return False
        if not self._gathered_full or self._tables_replaced() or self._want_full.is_set():
            self._want_full.clear()
            return self._submit("full", self._gather_full(now))
        data = self._gather_delta(now)
        done = False
        if data is not None:
            done = self._submit("delta", data)
            if self._queue is None and self._want_full.is_set():
                # Inline: Redis lost the snapshot; republish in full right away.
                self._want_full.clear()
                return self._submit("full", self._gather_full(now))
        if self._image_due(now):
            self._submit("image", self._gather_image(now))
        return done

    def publish_full(self, now: float | None = None) -> None:
        """Gather a full snapshot and publish it (inline: raises if Redis refuses)."""
        data = self._gather_full(time.monotonic() if now is None else now)
        if self._queue is not None:
            self._queue.put(("full", data))
            return
        self._take("full", data)
        self._flush(raise_errors=True)

    def close(self, timeout_s: float = 15.0) -> None:
        """Hand over the last changes, let the publisher thread write them, drop the connection.

        Waits at most ``timeout_s`` for Redis: a trainer stopping during an outage must not hang
        (the next trainer publishes a full snapshot anyway).
        """
        try:
            self._last_cycle = -np.inf
            self._last_dense = -np.inf  # the final dense weights too, not only the rows
            # The last changes must not be skipped for a full queue (a slow Redis, a slot
            # moving): wait for room, within the same bound.
            deadline = time.monotonic() + timeout_s
            while (self._queue is not None and self._queue.full()
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            self.maybe_publish()
            if self._queue is not None and self._thread is not None:
                try:
                    self._queue.put((_STOP, None), timeout=timeout_s)
                except queue.Full:
                    log.warning("publisher queue full at close; unpublished changes dropped")
                self._thread.join(timeout_s)
        finally:
            self.store.r.close()

    # ---- gathering (training thread) -------------------------------------------------------

    def _submit(self, kind: str, data: SnapshotData) -> bool:
        if self._queue is not None:
            self._queue.put_nowait((kind, data))  # never full: checked before gathering
            self.metrics.publish_queue_depth.set(self._queue.qsize())
            return True
        self._take(kind, data)
        return bool(self._flush())

    def _image_due(self, now: float) -> bool:
        if (self.image_interval_s <= 0 or now - self._last_image < self.image_interval_s
                or (self._queue is not None and self._queue.full())):
            return False
        return self._imaged != self._marker()

    def _marker(self) -> tuple[Any, ...]:
        return tuple(sorted(self._table_versions.items())), self._bandit_version

    def _gather_rows(self) -> SnapshotData:
        """Every live row and the bandit statistics, as copies (full snapshots and images)."""
        st = self.state
        data = SnapshotData()
        for slot, table in st.tables.items():
            data.emb[slot] = table.all_rows()
        bandit = st.bandit
        if bandit is not None:
            a = bandit.to_arrays()
            data.bandit = BanditRows(a["item_ids"], a["t"], a["d"], a["b"])
            data.bandit_header = _bandit_header(bandit)
            self.metrics.bandit_items.set(len(bandit))
        return data

    def _gather_image(self, now: float) -> SnapshotData:
        """The state the last gathered delta led to (gathered right after it, same thread)."""
        self._last_image = now
        self._imaged = self._marker()
        return self._gather_rows()

    def _gather_full(self, now: float) -> SnapshotData:
        st = self.state
        tables = st.tables
        data = self._gather_rows()
        versions = {}
        for slot, table in tables.items():
            versions[slot] = table.version
            table.trim_deletions(table.version)  # a full snapshot needs no deletion log
        bandit = st.bandit
        data.dense = model_arrays(st.model)
        cents = st.centroids()
        if cents is not None:
            data.centroids = {"centroids": cents[0], "counts": cents[1]}
        self._gathered_full = True
        self._table_versions = versions
        self._table_ids = {slot: id(t) for slot, t in tables.items()}
        self._bandit_version = bandit.version if bandit is not None else 0
        self._bandit_id = id(bandit)
        self._last_dense = now
        self._last_dense_arrays = data.dense
        self._last_centroids = cents
        self._last_image, self._imaged = now, self._marker()  # its write includes an image
        return data

    def _tables_replaced(self) -> bool:
        tables = self.state.tables
        if {s: id(t) for s, t in tables.items()} != self._table_ids:
            return True
        # A restored table may carry an older version counter than what we gathered.
        return any(t.version < self._table_versions.get(s, 0) for s, t in tables.items())

    def _gather_delta(self, now: float) -> SnapshotData | None:
        """Changes since the last gather (and trims the tables' deletion logs up to it)."""
        st = self.state
        data = SnapshotData()
        for slot, table in st.tables.items():
            ch = table.changes_since(self._table_versions[slot])
            if len(ch.ids):
                data.emb[slot] = (ch.ids, ch.vectors)
            if len(ch.deleted_ids):
                data.deleted[slot] = ch.deleted_ids
            self._table_versions[slot] = ch.version
            table.trim_deletions(ch.version)  # the deletions now travel with ``data``
        bandit = st.bandit
        if bandit is not None:
            since = self._bandit_version if id(bandit) == self._bandit_id else 0
            ids, d, b, self._bandit_version = bandit.changes_since(since)
            self._bandit_id = id(bandit)
            if len(ids):
                data.bandit = BanditRows(ids, np.full(len(ids), bandit.clock), d, b)
                data.bandit_header = _bandit_header(bandit)
            self.metrics.bandit_items.set(len(bandit))
        if now - self._last_dense >= self.dense_interval_s:
            self._last_dense = now
            dense = model_arrays(st.model)
            if not _same_arrays(dense, self._last_dense_arrays):
                data.dense = self._last_dense_arrays = dense
            cents = st.centroids()
            if cents is not None and not _same_centroids(cents, self._last_centroids):
                data.centroids = {"centroids": cents[0], "counts": cents[1]}
                self._last_centroids = cents
        return None if data.empty else data

    # ---- writing (publisher thread, or inline) ---------------------------------------------

    def _run(self) -> None:
        """The publisher thread: drain the queue, merge, write, back off while Redis is away."""
        assert self._queue is not None
        backoff, next_try, stopping = 0.05, 0.0, False
        while not stopping:
            waiting = self._full is not None or self._delta is not None or self._need_full
            try:
                items = [self._queue.get(timeout=max(0.01, next_try - time.monotonic())
                                         if waiting else 0.5)]
            except queue.Empty:
                items = []
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for kind, data in items:
                if kind == _STOP:
                    stopping = True
                elif data is not None:
                    self._take(kind, data)
            self.metrics.publish_queue_depth.set(self._queue.qsize())
            if time.monotonic() < next_try and not stopping:
                continue
            if self._flush() is None:
                next_try = time.monotonic() + backoff
                backoff = min(backoff * 2, 2.0)
            else:
                backoff, next_try = 0.05, 0.0

    def _take(self, kind: str, data: SnapshotData) -> None:
        """Add gathered changes to what waits for Redis."""
        if kind == "image":
            self._take_image(data)
            return
        if kind == "full":
            self._full, self._delta, self._need_full = data, None, False
        elif not self._need_full:  # else the full snapshot to come covers it
            if self._delta is None:
                self._delta = data
            else:
                self._delta = merge_deltas(self._delta, data)
                self.metrics.publish_merged.inc()
            if pending_rows(self._delta) > self.max_pending_rows:
                log.warning("merged delta passed %d rows while Redis was away: a full "
                            "snapshot follows once Redis answers", self.max_pending_rows)
                self._full = self._delta = None
                self._need_full = True
                self.metrics.publish_overflows.inc()
        rows = pending_rows(self._delta) if self._delta is not None else 0
        self.metrics.publish_pending_rows.set(rows)

    def _take_image(self, data: SnapshotData) -> None:
        """Write an image of the state after every delta taken so far — flushing those first,
        so the image is exactly the last written version. Dropped when that is not possible
        (Redis away, a full snapshot pending: it writes its own); the next interval retries."""
        if self._full is not None or self._need_full:
            return
        if self._delta is not None:
            self._flush()
        if self._delta is None and self._full is None and not self._need_full:
            self._write_image(data)

    def _write_image(self, data: SnapshotData) -> None:
        started = time.perf_counter()
        try:
            wrote = self.store.write_image(data)
        except REDIS_UNAVAILABLE as exc:
            self.metrics.publishes.labels("error").inc()
            self.metrics.publish_failures.inc()
            log.warning("writing the snapshot image failed (next interval retries): %s", exc)
            return
        if wrote:
            self._observe("image", started, data)

    def _flush(self, raise_errors: bool = False) -> bool | None:
        """Write what waits; True if something was written, None if Redis failed."""
        try:
            if self._need_full:
                self.store.r.ping()  # Redis answers again: ask the training thread for one
                self._want_full.set()
                return False
            wrote = False
            if self._full is not None:
                self._write_full(self._full)
                self._full, wrote = None, True
            if self._delta is not None:
                if self.store.current_generation() != self.generation:
                    log.info("Redis no longer holds generation %s: republishing in full",
                             self.generation)
                    self._delta, self._need_full = None, True
                    self._want_full.set()
                    return wrote
                self._write_delta(self._delta)
                self._delta, wrote = None, True
                self.metrics.publish_pending_rows.set(0)
            return wrote
        except REDIS_UNAVAILABLE as exc:
            self.errors += 1
            self.metrics.publishes.labels("error").inc()
            self.metrics.publish_failures.inc()
            now = time.monotonic()
            if now - self._last_error_log > 10.0:
                log.warning("publish failed (retrying, changes merge meanwhile): %s", exc)
                self._last_error_log = now
            if raise_errors:
                raise
            return None

    def _write_full(self, data: SnapshotData) -> None:
        """Write every live row, the bandit statistics and the dense weights under a new
        generation, then switch readers to it (see :meth:`SnapshotStore.write_full`)."""
        started = time.perf_counter()
        st = self.state
        meta = self.store.read_meta()
        version = max(self.version, meta.version if meta else 0) + 1
        self.version = version
        self.generation = self.store.write_full(
            data, version=version, prev_version=self.confirmed_version,
            schema_hash=st.config.schema_hash,
            slots={s.name: s.dim for s in st.config.slots},
        )
        self.confirmed_version = self.dense_version = version
        self.centroids_version = version if data.centroids is not None else 0
        self._observe("full", started, data)
        log.info("published full snapshot v%d generation %s (%d rows)", version,
                 self.generation, data.n_rows)
        if self.image_interval_s > 0:
            self._write_image(data)

    def _write_delta(self, data: SnapshotData) -> None:
        started = time.perf_counter()
        version = self.version + 1
        self.version = version
        dense_version = version if data.dense is not None else self.dense_version
        cents_version = version if data.centroids is not None else self.centroids_version
        self.store.write_delta(
            data, generation=self.generation or "", version=version,
            prev_version=self.confirmed_version, dense_version=dense_version,
            centroids_version=cents_version, prev_dense_version=self.dense_version,
        )
        self.confirmed_version = version
        self.dense_version, self.centroids_version = dense_version, cents_version
        self._observe("delta" if data.dense is None else "dense", started, data)

    def _observe(self, kind: str, started: float, data: SnapshotData) -> None:
        m = self.metrics
        m.publish_seconds.observe(time.perf_counter() - started)
        m.publish_rows.observe(data.n_rows)
        m.publishes.labels(kind).inc()
        m.snapshot_version.set(self.confirmed_version)
        m.last_publish.set(time.time())


def _bandit_header(bandit: DiagLinUCB) -> BanditHeader:
    clock = bandit.clock
    return BanditHeader(bandit.n_clusters, bandit.lam, bandit.half_life_s, bandit.version,
                        float(clock) if np.isfinite(clock) else None)


def _same_arrays(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None or a.keys() != b.keys():
        return False
    return all(np.array_equal(a[k], b[k]) for k in a)


def _same_centroids(a: Centroids | None, b: Centroids | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def make_publisher(settings: Settings, trainer: Trainer, metrics: TrainerMetrics,
                   ranks: Ranks | None = None) -> Publisher:
    """The publisher of a trainer process or rank (what ``trainer.main`` wires into the loop)."""
    client = redis_client(settings, socket_timeout=5.0, socket_connect_timeout=2.0)
    return Publisher(snapshot_store(settings, client, ranks), _TrainerState(trainer), settings,
                     metrics, background=True)


def snapshot_store(settings: Settings, client: Any, ranks: Ranks | None = None
                   ) -> SnapshotStore | BucketedStore:
    """The store of the layout ``settings.snapshot_buckets`` asks for (docs/scale.md).

    A trainer rank writes the chains of the buckets it owns, and rank 0 the head too: every
    chain has exactly one writer, so each keeps its own version chain. Ranks need the
    bucketed layout (one chain cannot have R writers) with the buckets their ownership uses.
    """
    if ranks is not None:
        if settings.snapshot_buckets != ranks.n_buckets:
            raise ValueError(f"trainer ranks publish per bucket: snapshot_buckets must be the "
                             f"ranks' {ranks.n_buckets} buckets, not {settings.snapshot_buckets}")
        return BucketedStore(client, settings.model_name, n_buckets=ranks.n_buckets,
                             owned=ranks.owned_buckets(), head=ranks.rank == 0,
                             writer=f"rank-{ranks.rank}")
    if settings.snapshot_buckets:
        return BucketedStore(client, settings.model_name, n_buckets=settings.snapshot_buckets)
    return SnapshotStore(client, settings.model_name)


__all__ = [
    "Centroids", "PublishableState", "Publisher", "StateSource", "make_publisher",
    "snapshot_store",
]  # fmt: skip
