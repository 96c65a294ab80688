"""Following a bucketed snapshot: the head chain and one chain per ID bucket (Redis Cluster).

The replica state is the same :class:`~service.snapshot.ServingSnapshot` as for one chain; only
the bookkeeping differs. Each chain has its own generation, version and stream position, and an
update applies when it chains onto *its* chain's version. A bucket's update changes rows only
(the replica's version is the head's, which moves with the dense weights). Any chain that does
not chain — a trainer rank restarted, a master lost its data, the stream was trimmed — makes the
replica reload every chain; that is rare, and one code path for it keeps the state consistent.

Why polling: a blocking XREAD cannot span streams in different cluster slots, so every chain's
stream is read without blocking in one pipeline (one round trip per master) and the follower
sleeps ``poll_ms`` when nothing came.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from featurestore.schema import ModelConfig
from featurestore.snapshot_buckets import AsyncBucketedReader, BucketedFull, Chain
from featurestore.snapshot_types import SnapshotMeta
from freshrec.background import in_background
from freshrec.metrics import ServiceMetrics
from service.snapshot import ServingSnapshot, SnapshotFollower

log = logging.getLogger("freshrec.service")


@dataclass
class ChainState:
    """Where the replica stands on one chain."""

    meta: SnapshotMeta
    version: int
    position: bytes


class BucketedFollower(SnapshotFollower):
    """Loads every chain and follows all their streams until cancelled."""

    def __init__(self, reader: AsyncBucketedReader, config: ModelConfig,
                 metrics: ServiceMetrics, poll_ms: int = 50) -> None:
        super().__init__(reader, config, metrics)  # type: ignore[arg-type]
        self.buckets = reader
        self.poll_s = poll_ms / 1000.0
        self.chains: dict[Chain, ChainState] = {}

    async def load_full(self) -> bool:
        """Load every chain; False until every chain has a snapshot."""
        full: BucketedFull | None = await self.buckets.read_full()
        if full is None:
            return False
        snap = await in_background(ServingSnapshot.from_full, full.merged(), self.config)
        self.snapshot = snap
        self.chains = {c: ChainState(f.meta, f.meta.version, f.stream_id)
                       for c, f in full.chains().items()}
        self.full_loads += 1
        self.metrics.snapshot_updates.labels("full").inc()
        self._gauges()
        log.info("loaded bucketed snapshot v%d over %d chains (%s)", snap.version,
                 len(self.chains), snap.table_sizes())
        return True

    async def step(self) -> None:
        """One poll of every chain's stream; applies what chains, reloads when one breaks."""
        if self.snapshot is None:
            if not await self.load_full():
                await asyncio.sleep(0.2)
            return
        batches = await self.buckets.read_updates(
            {c: st.position for c, st in self.chains.items()})
        self.connected = True
        if not any(batches.values()):
            await asyncio.sleep(self.poll_s)
            return
        for chain, updates in batches.items():
            st = self.chains[chain]
            for u in updates:
                snap = self.snapshot
                if u.generation == st.meta.generation and u.version <= st.version:
                    st.position = u.stream_id  # contained in what we loaded
                    continue
                if u.kind != "delta" or u.generation != st.meta.generation or (
                        u.prev_version != st.version):
                    log.info("chain %s: update v%d (prev v%d, %s) does not chain onto v%d: "
                             "reloading", chain, u.version, u.prev_version, u.kind, st.version)
                    if not await self.load_full():
                        self.snapshot = snap
                    return
                if chain is None:
                    rows = await self.buckets.fetch_delta(chain, u, st.meta, snap.dense_version,
                                                          snap.centroids_version)
                    snap.commit(await in_background(snap.prepare, u, rows))
                else:
                    rows = await self.buckets.fetch_delta(chain, u, st.meta, 0, 0)
                    # Rows only: the replica's versions stay the head's.
                    as_rows = dataclasses.replace(
                        u, version=snap.version, dense_version=snap.dense_version,
                        centroids_version=snap.centroids_version,
                        updated=max(snap.updated, u.updated))
                    snap.commit(await in_background(snap.prepare, as_rows, rows))
                st.version = u.version
                st.position = u.stream_id
                self.metrics.snapshot_updates.labels("delta").inc()
        self._gauges()


__all__ = ["BucketedFollower", "ChainState"]
