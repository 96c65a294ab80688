"""The in-memory serving snapshot of one replica, and the task that keeps it current.

A replica holds everything it scores with in process memory — per slot an ID -> vector store,
the dense model, the Diag-LinUCB statistics and the user-cluster centroids — so a request touches
no network. :class:`SnapshotFollower` loads the current snapshot from Redis alone, then follows
the update stream with blocking XREAD (no polling delay).

What runs where: Redis I/O is awaited on the event loop (replies are a few large byte strings,
cheap to parse). The CPU work — decoding a full snapshot and building its stores, preparing
each delta (vectorized merges into new index arrays, a new dense model) — runs on a worker
thread while requests keep scoring against the current state; the result is then committed on
the loop by reference assignments, so a request sees either the old state or the new one,
never a half-applied delta, and no lock is needed (see :mod:`service.vectors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from bandit.diag_linucb import DiagLinUCB
from featurestore.schema import ModelConfig
from featurestore.snapshot_codec import SnapshotFormatError
from featurestore.snapshot_reader import AsyncSnapshotReader
from featurestore.snapshot_types import (
    BanditRows,
    DeltaRows,
    FullSnapshot,
    SnapshotMeta,
    Update,
)
from freshrec.background import in_background
from freshrec.metrics import ServiceMetrics
from freshrec.redis_client import REDIS_UNAVAILABLE
from service.dense import NumpyCTR
from service.vectors import SlotChange, SlotVectors
from trainer.model import CTRModel, load_model_arrays

log = logging.getLogger("freshrec.service")


def _dense_model(config: ModelConfig, arrays: dict[str, np.ndarray]) -> CTRModel:
    model = CTRModel(config)
    load_model_arrays(model, arrays)
    model.eval()
    return model


BANDIT_INLINE_ROWS = 4_096  # bigger bandit patches are applied to a copy, off the loop


def _bandit_from_rows(header_n: int, lam: float, half_life_s: float, version: int,
                      clock: float | None, rows: BanditRows) -> DiagLinUCB:
    return DiagLinUCB.from_arrays({
        "item_ids": rows.item_ids, "d": rows.d, "b": rows.b, "t": rows.t,
        "row_version": np.zeros(len(rows.item_ids), dtype=np.int64),
        "n_clusters": np.array(header_n), "lam": np.array(lam),
        "half_life_s": np.array(half_life_s), "dedup_capacity": np.array(1),
        "version": np.array(version), "clock": np.array(-np.inf if clock is None else clock),
    })  # fmt: skip


@dataclass(frozen=True)
class PreparedUpdate:
    """A delta made ready off the loop: per-slot changes, a new bandit or dense model if any."""

    update: Update
    rows: DeltaRows
    slots: dict[str, SlotChange]
    bandit: DiagLinUCB | None  # a patched copy (big patches) or a first bandit; else None
    model: CTRModel | None
    dense: NumpyCTR | None


@dataclass
class ServingSnapshot:
    """Everything one replica scores with, at one snapshot version."""

    config: ModelConfig
    meta: SnapshotMeta
    version: int
    dense_version: int
    centroids_version: int
    updated: float  # wall time of the publish this state reflects
    slots: dict[str, SlotVectors]
    model: CTRModel
    bandit: DiagLinUCB | None = None
    centroids: np.ndarray | None = None
    counts: np.ndarray | None = None
    applied: dict[str, int] = field(default_factory=dict)
    dense: NumpyCTR = field(init=False)  # the forward pass the service runs (from ``model``)

    def __post_init__(self) -> None:
        self.dense = NumpyCTR(self.model)

    @property
    def generation(self) -> str:
        return self.meta.generation

    @classmethod
    def from_full(cls, full: FullSnapshot, config: ModelConfig) -> ServingSnapshot:
        """Build from a full read; refuses snapshots of another model config."""
        meta = full.meta
        if meta.schema_hash != config.schema_hash:
            raise SnapshotFormatError(
                f"snapshot schema {meta.schema_hash} != model config {config.schema_hash}")
        slots = {}
        for s in config.slots:
            ids, vectors = full.emb.get(s.name, (np.empty(0, np.int64),
                                                  np.empty((0, s.dim), np.float32)))
            slots[s.name] = SlotVectors.build(s.dim, ids, vectors)
        bandit = None
        if meta.bandit is not None and full.bandit is not None:
            h = meta.bandit
            bandit = _bandit_from_rows(h.n_clusters, h.lam, h.half_life_s, h.version, h.clock,
                                       full.bandit)
        snap = cls(config, meta, meta.version, meta.dense_version, meta.centroids_version,
                   meta.updated, slots, _dense_model(config, full.dense), bandit)
        if full.centroids is not None:
            snap._set_centroids(full.centroids)
        return snap

    def _set_centroids(self, arrays: dict[str, np.ndarray]) -> None:
        c = arrays.get("centroids")
        if c is None or c.ndim != 2 or c.shape[0] == 0:
            self.centroids = self.counts = None
            return
        self.centroids = c.astype(np.float32)
        counts = arrays.get("counts")
        self.counts = counts if counts is not None and len(counts) == len(c) else None

    def prepare(self, update: Update, rows: DeltaRows) -> PreparedUpdate:
        """The CPU work of applying a delta, leaving this snapshot untouched (worker thread)."""
        slots = {}
        for slot, store in self.slots.items():
            ids, vectors = rows.emb.get(slot, (np.empty(0, np.int64), None))
            deleted = rows.deleted.get(slot, np.empty(0, np.int64))
            if len(ids) or len(deleted):
                if vectors is None:
                    vectors = np.empty((0, store.dim), np.float32)
                slots[slot] = store.prepare(ids, vectors, deleted)
        bandit = None
        if rows.bandit is not None and update.bandit_header is not None:
            h = update.bandit_header
            if self.bandit is None:
                bandit = _bandit_from_rows(h.n_clusters, h.lam, h.half_life_s, h.version,
                                           h.clock, rows.bandit)
            elif len(rows.bandit.item_ids) > BANDIT_INLINE_ROWS:
                bandit = DiagLinUCB.from_arrays(self.bandit.to_arrays())
                bandit.patch(rows.bandit.item_ids, rows.bandit.d, rows.bandit.b, h.version,
                             ts=h.clock)
        model = _dense_model(self.config, rows.dense) if rows.dense is not None else None
        return PreparedUpdate(update, rows, slots, bandit, model,
                              None if model is None else NumpyCTR(model))

    def commit(self, p: PreparedUpdate) -> None:
        """Make a prepared delta visible (on the loop, between requests: cheap assignments)."""
        for slot, change in p.slots.items():
            self.slots[slot].commit(change)
        rows, update = p.rows, p.update
        if p.bandit is not None:
            self.bandit = p.bandit
        elif rows.bandit is not None and update.bandit_header is not None \
                and self.bandit is not None:  # an empty DiagLinUCB is falsy (len 0)
            h = update.bandit_header
            self.bandit.patch(rows.bandit.item_ids, rows.bandit.d, rows.bandit.b, h.version,
                              ts=h.clock)
        if p.model is not None and p.dense is not None:
            self.model, self.dense = p.model, p.dense
        if rows.centroids is not None:
            self._set_centroids(rows.centroids)
        self.version = update.version
        self.dense_version = update.dense_version
        self.centroids_version = update.centroids_version
        self.updated = update.updated

    def apply(self, update: Update, rows: DeltaRows) -> None:
        """Prepare and commit at once (where nothing reads concurrently)."""
        self.commit(self.prepare(update, rows))

    def table_sizes(self) -> dict[str, int]:
        return {name: len(sv) for name, sv in self.slots.items()}


class SnapshotFollower:
    """Loads the snapshot and follows the update stream until cancelled.

    Readiness is ``snapshot is not None``: once a snapshot was loaded the replica keeps serving
    it through Redis outages (reconnecting with capped exponential backoff) and reloads fully
    whenever the ``prev_version`` chain breaks (stream trimmed past its position, a new
    generation after Redis lost the data, a publisher restart).
    """

    def __init__(self, reader: AsyncSnapshotReader, config: ModelConfig,
                 metrics: ServiceMetrics, block_ms: int = 1000) -> None:
        self.reader = reader
        self.config = config
        self.metrics = metrics
        self.block_ms = block_ms
        self.snapshot: ServingSnapshot | None = None
        self.position = b"0-0"
        self.full_loads = 0
        self.last_full_source = ""  # "image" or "scan": how the last full load read Redis
        self.connected = False
        self._last_log = -np.inf

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log > 10.0:
            log.warning(msg, *args)
            self._last_log = now

    async def load_full(self) -> bool:
        """Load the current snapshot; False when Redis has none (yet)."""
        full = await self.reader.read_full()
        if full is None:
            return False
        snap = await in_background(ServingSnapshot.from_full, full, self.config)
        self.snapshot = snap
        self.position = full.stream_id
        self.full_loads += 1
        self.last_full_source = full.source
        self.metrics.snapshot_updates.labels("full").inc()
        self._gauges()
        log.info("loaded snapshot v%d generation %s (%s) from %s", snap.version,
                 snap.generation, snap.table_sizes(), full.source)
        return True

    def _gauges(self) -> None:
        snap = self.snapshot
        if snap is not None:
            self.metrics.ready.set(1)
            self.metrics.snapshot_version.set(snap.version)
            self.metrics.snapshot_age.set(max(0.0, time.time() - snap.updated))

    async def step(self) -> None:
        """One iteration: (re)load if needed, else one blocking read of the stream."""
        if self.snapshot is None:
            if not await self.load_full():
                await asyncio.sleep(0.2)
            return
        updates = await self.reader.read_updates(self.position, count=64,
                                                 block_ms=self.block_ms)
        self.connected = True
        for u in updates:
            snap = self.snapshot
            if u.generation == snap.generation and u.version <= snap.version:
                self.position = u.stream_id  # already contained in what we loaded
                continue
            if u.kind != "delta" or u.generation != snap.generation or (
                    u.prev_version != snap.version):
                log.info("update v%d (prev v%d, %s, generation %s) does not chain onto v%d: "
                         "reloading", u.version, u.prev_version, u.kind, u.generation,
                         snap.version)
                if not await self.load_full():
                    self.snapshot = snap  # keep serving the old one until a new one exists
                return
            rows = await self.reader.fetch_delta(u, snap.meta, snap.dense_version,
                                                 snap.centroids_version)
            snap.commit(await in_background(snap.prepare, u, rows))
            self.position = u.stream_id
            self.metrics.snapshot_updates.labels("delta").inc()
        self._gauges()

    async def run(self, until: asyncio.Event | None = None) -> None:
        """Follow until ``until`` is set, or forever (cancel the task to stop).

        ``until`` stops between two steps, never inside a Redis command: redis-py's asyncio
        cluster client was seen to swallow a cancellation that lands mid-command and retry.
        """
        backoff = 0.05
        while until is None or not until.is_set():
            try:
                await self.step()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except REDIS_UNAVAILABLE as exc:
                self.connected = False
                self._warn("redis unavailable, serving the last snapshot: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except SnapshotFormatError as exc:
                self._warn("unusable snapshot data (%s); reloading", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                try:
                    await self.load_full()
                except (*REDIS_UNAVAILABLE, SnapshotFormatError) as again:
                    self._warn("reload failed: %s", again)


def torch_threads() -> None:
    """One intra-op thread: requests are small and concurrent, so threads only contend."""
    torch.set_num_threads(1)
