"""The snapshot publisher: pushes what the trainer changed to Redis, between training batches.

Driven from the training thread (:meth:`Publisher.maybe_publish` after each batch), because the
embedding tables have one writer and no locks: gathering changes here is race-free, and every
gathered array is a copy. Redis I/O is done inline too. Measured on the dev VM (see
docs/serving.md): a delta of a few hundred rows is one MULTI/EXEC round trip of ~1-2 ms, far
below the 200 ms publish interval, so a background writer thread would buy nothing but a second
copy of the bookkeeping (what was confirmed, when deletions may be trimmed). A full snapshot does
block training for its duration (about a second per 100 k rows); it happens at start and when
Redis lost the data.

Per cycle: one cheap ``HGET meta generation`` detects a flushed/restarted Redis (or another
publisher) and triggers a full snapshot; otherwise touched rows since the last *confirmed*
table versions, deleted IDs, changed bandit rows, and — every
``trainer_dense_publish_interval_s``, when they changed — the dense weights and user-cluster
centroids. Deletions are trimmed from the tables only after Redis confirmed the publish. A failed
publish is retried from the same confirmed versions next cycle (rows are overwritten, so
repeating them is harmless); its version number is burnt, so replicas see a gap in the
``prev_version`` chain and reload fully rather than miss anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import redis

from bandit.diag_linucb import DiagLinUCB
from featurestore.schema import ModelConfig
from featurestore.snapshot_types import BanditHeader, BanditRows, SnapshotData
from featurestore.snapshot_writer import SnapshotStore
from featurestore.table import TableSet
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from trainer.model import CTRModel, model_arrays

if TYPE_CHECKING:
    from trainer.loop import Trainer

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


class Publisher:
    """Publishes full snapshots and deltas of a trainer's state to a :class:`SnapshotStore`."""

    def __init__(self, store: SnapshotStore, state: StateSource | PublishableState,
                 settings: Settings, metrics: TrainerMetrics | None = None) -> None:
        self.store = store
        self.state = state
        self.metrics = metrics or TrainerMetrics()
        self.interval_s = settings.trainer_publish_interval_ms / 1000.0
        self.dense_interval_s = settings.trainer_dense_publish_interval_s
        self.version = 0  # last version number used (confirmed or not)
        self.confirmed_version = 0  # last version Redis acknowledged
        self.generation: str | None = None
        self.dense_version = 0
        self.centroids_version = 0
        self._table_versions: dict[str, int] = {}
        self._table_ids: dict[str, int] = {}  # id() of each table, to notice restores
        self._bandit_version = 0
        self._bandit_id = 0
        self._last_cycle = -np.inf
        self._last_dense = -np.inf
        self._last_dense_arrays: dict[str, np.ndarray] | None = None
        self._last_centroids: Centroids | None = None
        self._last_error_log = -np.inf
        self.errors = 0

    # ---- the loop's entry point -----------------------------------------------------------

    def maybe_publish(self, now: float | None = None) -> bool:
        """Publish if the interval elapsed; True if something was written to Redis.

        Never raises on Redis errors (the trainer must keep learning through a Redis outage):
        they are logged, counted, and the next cycle retries.
        """
        now = time.monotonic() if now is None else now
        if now - self._last_cycle < self.interval_s:
            return False
        self._last_cycle = now
        try:
            if self.generation is None or self._tables_replaced() or (
                    self.store.current_generation() != self.generation):
                self.publish_full(now)
                return True
            return self._publish_delta(now)
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            self.metrics.publishes.labels("error").inc()
            if now - self._last_error_log > 10.0:
                log.warning("publish failed (will retry every cycle): %s", exc)
                self._last_error_log = now
            return False

    def publish_full(self, now: float | None = None) -> None:
        """Write every live row, the bandit statistics and the dense weights under a new
        generation, then switch readers to it (see :meth:`SnapshotStore.write_full`)."""
        now = time.monotonic() if now is None else now
        started = time.perf_counter()
        st = self.state
        tables = st.tables
        data = SnapshotData()
        versions = {}
        for slot, table in tables.items():
            ids, vectors = table.all_rows()
            data.emb[slot] = (ids, vectors)
            versions[slot] = table.version
        bandit = st.bandit
        if bandit is not None:
            a = bandit.to_arrays()
            data.bandit = BanditRows(a["item_ids"], a["t"], a["d"], a["b"])
            data.bandit_header = _bandit_header(bandit)
        data.dense = model_arrays(st.model)
        cents = st.centroids()
        if cents is not None:
            data.centroids = {"centroids": cents[0], "counts": cents[1]}
        meta = self.store.read_meta()
        version = max(self.version, meta.version if meta else 0) + 1
        self.version = version
        self.generation = self.store.write_full(
            data, version=version, prev_version=self.confirmed_version,
            schema_hash=st.config.schema_hash,
            slots={s.name: s.dim for s in st.config.slots},
        )
        self.confirmed_version = self.dense_version = version
        self.centroids_version = version if cents is not None else 0
        self._table_versions = versions
        self._table_ids = {slot: id(t) for slot, t in tables.items()}
        for slot, table in tables.items():
            table.trim_deletions(versions[slot])
        self._bandit_version = bandit.version if bandit is not None else 0
        self._bandit_id = id(bandit)
        self._last_dense = now
        self._last_dense_arrays = data.dense
        self._last_centroids = cents
        self._observe("full", started, data)
        log.info("published full snapshot v%d generation %s (%d rows)", version,
                 self.generation, data.n_rows)

    def close(self) -> None:
        """Final delta so nothing trained is left unpublished, then drop the connection."""
        try:
            self._last_cycle = -np.inf
            self.maybe_publish()
        finally:
            self.store.r.close()

    # ---- internals ------------------------------------------------------------------------

    def _tables_replaced(self) -> bool:
        tables = self.state.tables
        if {s: id(t) for s, t in tables.items()} != self._table_ids:
            return True
        # A restored table may carry an older version counter than what we published.
        return any(t.version < self._table_versions.get(s, 0) for s, t in tables.items())

    def _publish_delta(self, now: float) -> bool:
        started = time.perf_counter()
        st = self.state
        data = SnapshotData()
        versions = {}
        for slot, table in st.tables.items():
            ch = table.changes_since(self._table_versions[slot])
            if len(ch.ids):
                data.emb[slot] = (ch.ids, ch.vectors)
            if len(ch.deleted_ids):
                data.deleted[slot] = ch.deleted_ids
            versions[slot] = ch.version
        bandit = st.bandit
        bandit_version = self._bandit_version
        if bandit is not None:
            since = self._bandit_version if id(bandit) == self._bandit_id else 0
            ids, d, b, bandit_version = bandit.changes_since(since)
            if len(ids):
                clock = bandit.clock
                data.bandit = BanditRows(ids, np.full(len(ids), clock), d, b)
                data.bandit_header = _bandit_header(bandit)
        dense_version, cents_version = self.dense_version, self.centroids_version
        new_dense, new_cents = self._last_dense_arrays, self._last_centroids
        dense_due = now - self._last_dense >= self.dense_interval_s
        if dense_due:
            new_dense = model_arrays(st.model)
            if not _same_arrays(new_dense, self._last_dense_arrays):
                data.dense = new_dense
            new_cents = st.centroids()
            if new_cents is not None and not _same_centroids(new_cents, self._last_centroids):
                data.centroids = {"centroids": new_cents[0], "counts": new_cents[1]}
        if data.empty:
            # Nothing to announce; table versions may still have moved (lookups of rejected
            # IDs bump them), so skip ahead — nothing after the old version was missed.
            self._table_versions = versions
            self._bandit_version, self._bandit_id = bandit_version, id(bandit)
            if dense_due:
                self._last_dense = now
            return False
        version = self.version + 1
        self.version = version
        if data.dense is not None:
            dense_version = version
        if data.centroids is not None:
            cents_version = version
        self.store.write_delta(
            data, generation=self.generation or "", version=version,
            prev_version=self.confirmed_version, dense_version=dense_version,
            centroids_version=cents_version, prev_dense_version=self.dense_version,
        )
        # Confirmed: advance what the next delta starts from, and let the tables forget
        # deletions that are now in Redis.
        self.confirmed_version = version
        self.dense_version, self.centroids_version = dense_version, cents_version
        self._table_versions = versions
        for slot, table in st.tables.items():
            table.trim_deletions(versions[slot])
        self._bandit_version, self._bandit_id = bandit_version, id(bandit)
        if dense_due:
            self._last_dense = now
            self._last_dense_arrays, self._last_centroids = new_dense, new_cents
        self._observe("delta" if data.dense is None else "dense", started, data)
        return True

    def _observe(self, kind: str, started: float, data: SnapshotData) -> None:
        m = self.metrics
        m.publish_seconds.observe(time.perf_counter() - started)
        m.publish_rows.observe(data.n_rows)
        m.publishes.labels(kind).inc()
        m.snapshot_version.set(self.confirmed_version)
        m.last_publish.set(time.time())
        bandit = self.state.bandit
        if bandit is not None:
            m.bandit_items.set(len(bandit))


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


def make_publisher(settings: Settings, trainer: Trainer, metrics: TrainerMetrics) -> Publisher:
    """The publisher of a trainer process (what ``trainer.main`` wires into the loop)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5.0,
                                  socket_connect_timeout=2.0)
    store = SnapshotStore(client, settings.model_name)
    return Publisher(store, _TrainerState(trainer), settings, metrics)


__all__ = ["Centroids", "PublishableState", "Publisher", "StateSource", "make_publisher"]
