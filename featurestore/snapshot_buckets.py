"""The bucketed snapshot layout: a head chain plus one chain per ID bucket (Redis Cluster).

Every feature ID falls into one of ``n_buckets`` fixed buckets (:func:`bucket_of`). Each bucket
is a chain of its own — meta, update stream, row hashes, all under the hash tag
``{model:b<k>}`` — with its own version chain, so:

- a model spreads over every master of a Redis Cluster (one chain is one slot);
- a publish to one bucket is still one MULTI/EXEC transaction on one node;
- a trainer rank that owns some buckets publishes those chains and nothing else, and the head
  chain (``{model}``: dense weights, centroids, the schema) is published by one writer only.

A publish writes the touched buckets' chains, then the head when the dense weights or the
centroids changed. A bucket chain's ``prev_version`` is the last version written *to that
chain*, so an untouched bucket costs nothing and a publish that failed half-way leaves every
chain consistent: the buckets it reached are one version further, the retry chains onto each
(:class:`BucketedStore` keeps one confirmed version per chain).

:class:`BucketedStore` has the interface of :class:`~featurestore.snapshot_writer.SnapshotStore`
that :class:`~trainer.publisher.Publisher` uses, so the publisher (gathering, merging while
Redis is away, full snapshots on demand) is the same for both layouts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis

from featurestore.snapshot_keys import bucket_of
from featurestore.snapshot_reader import AsyncSnapshotReader, SnapshotReader
from featurestore.snapshot_types import (
    BanditRows,
    DeltaRows,
    FullSnapshot,
    SnapshotData,
    SnapshotMeta,
    Update,
)
from featurestore.snapshot_writer import SnapshotStore

Chain = int | None  # a bucket number, or None for the head chain

_NO_IDS = np.empty(0, dtype=np.int64)


def _groups(ids: np.ndarray, n_buckets: int) -> dict[int, np.ndarray]:
    """Bucket -> positions in ``ids`` of its IDs (one argsort, not a pass per bucket)."""
    if not len(ids):
        return {}
    b = bucket_of(ids, n_buckets)
    order = np.argsort(b, kind="stable")
    sorted_b = b[order]
    present, starts = np.unique(sorted_b, return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(k): order[s:e] for k, s, e in zip(present, starts, ends, strict=True)}


def split_by_bucket(data: SnapshotData, n_buckets: int) -> dict[int, SnapshotData]:
    """The rows, deletions and bandit rows of ``data`` per bucket (buckets with any)."""
    out: dict[int, SnapshotData] = {}

    def part(k: int) -> SnapshotData:
        if k not in out:
            out[k] = SnapshotData(bandit_header=data.bandit_header)
        return out[k]

    for slot, (ids, vectors) in data.emb.items():
        for k, sel in _groups(ids, n_buckets).items():
            part(k).emb[slot] = (ids[sel], vectors[sel])
    for slot, ids in data.deleted.items():
        for k, sel in _groups(ids, n_buckets).items():
            part(k).deleted[slot] = ids[sel]
    if data.bandit is not None:
        b = data.bandit
        for k, sel in _groups(b.item_ids, n_buckets).items():
            part(k).bandit = BanditRows(b.item_ids[sel], b.t[sel], b.d[sel], b.b[sel])
    return out


class BucketedStore:
    """Writes the chains of the buckets this writer owns (and the head chain if it is told to).

    ``owned`` defaults to every bucket (one trainer process). Rows of a bucket it does not own
    are refused: they would be a second writer on another rank's chain.
    """

    def __init__(self, client: redis.Redis, model_name: str, *, n_buckets: int,
                 owned: Iterable[int] | None = None, head: bool = True,
                 row_dtype: str = "float32", emb_shards: int = 1,
                 bandit_shards: int = 1, writer: str = "") -> None:
        if n_buckets < 1:
            raise ValueError("n_buckets must be at least 1")
        self.r = client
        self.model = model_name
        self.n_buckets = n_buckets
        owned = range(n_buckets) if owned is None else sorted(set(owned))
        if any(not 0 <= k < n_buckets for k in owned):
            raise ValueError(f"owned buckets must lie in [0, {n_buckets})")
        self.stores: dict[Chain, SnapshotStore] = {
            k: SnapshotStore(client, model_name, row_dtype=row_dtype, emb_shards=emb_shards,
                             bandit_shards=bandit_shards, bucket=k, writer=writer)
            for k in owned}
        self.head = head
        if head:
            self.stores[None] = SnapshotStore(client, model_name, row_dtype=row_dtype,
                                              emb_shards=0, bandit_shards=0, writer=writer)
        self.row_dtype = row_dtype
        self._versions: dict[Chain, int] = {c: 0 for c in self.stores}  # confirmed per chain
        self._generations: dict[Chain, str] = {}

    # -- what the publisher reads --

    def read_meta(self) -> SnapshotMeta | None:
        """The meta of the newest chain this writer owns (versions continue after restarts)."""
        metas = [s.read_meta() for s in self.stores.values()]
        metas = [m for m in metas if m is not None]
        return max(metas, key=lambda m: m.version) if metas else None

    def current_generation(self) -> str | None:
        """One round trip: the generations of every owned chain, as one token.

        Differs from what :meth:`write_full` returned as soon as any chain lost its data (a
        master restarted empty) or was replaced, which makes the publisher republish in full.
        """
        pipe = self.r.pipeline(transaction=False)
        for s in self.stores.values():
            pipe.hget(s.keys.meta, "generation")
        got = pipe.execute()
        return _token([g.decode() if g is not None else "-" for g in got])

    # -- writes --

    def _split(self, data: SnapshotData) -> dict[int, SnapshotData]:
        parts = split_by_bucket(data, self.n_buckets)
        foreign = sorted(k for k in parts if k not in self.stores)
        if foreign:
            raise ValueError(f"rows of buckets this writer does not own: {foreign[:8]}")
        return parts

    def write_full(self, data: SnapshotData, *, version: int, prev_version: int,
                   schema_hash: str, slots: Mapping[str, int], created: float | None = None,
                   now: float | None = None) -> str:
        """Every owned chain in full (an empty bucket too: readers wait for every chain)."""
        del prev_version  # each chain continues from its own last version
        parts = self._split(data)
        for chain, store in self.stores.items():
            if chain is None:
                part = SnapshotData(bandit_header=data.bandit_header, dense=data.dense,
                                    centroids=data.centroids)
            else:
                part = parts.get(chain, SnapshotData(bandit_header=data.bandit_header))
            self._generations[chain] = store.write_full(
                part, version=version, prev_version=self._versions[chain],
                schema_hash=schema_hash, slots=slots, created=created, now=now)
            self._versions[chain] = version
        return _token([self._generations[c] for c in self.stores])

    def write_delta(self, data: SnapshotData, *, generation: str, version: int,
                    prev_version: int, dense_version: int, centroids_version: int,
                    prev_dense_version: int, now: float | None = None) -> None:
        """The touched buckets' chains, then the head if the dense weights or centroids moved.

        Stops at the first chain Redis refuses (the publisher retries the whole delta merged
        with what came next; chains already written take the retry as one more version).
        """
        del generation, prev_version  # per chain, below
        for chain, part in self._split(data).items():
            self.stores[chain].write_delta(
                part, generation=self._generations.get(chain, ""), version=version,
                prev_version=self._versions[chain], dense_version=0, centroids_version=0,
                prev_dense_version=0, now=now)
            self._versions[chain] = version
        if self.head and (data.dense is not None or data.centroids is not None):
            head = SnapshotData(bandit_header=data.bandit_header, dense=data.dense,
                                centroids=data.centroids)
            self.stores[None].write_delta(
                head, generation=self._generations.get(None, ""), version=version,
                prev_version=self._versions[None], dense_version=dense_version,
                centroids_version=centroids_version, prev_dense_version=prev_dense_version,
                now=now)
            self._versions[None] = version

    def write_image(self, data: SnapshotData) -> bool:
        """An image per owned bucket chain that published since its last one (see
        :meth:`SnapshotStore.write_image`); the head chain carries no rows."""
        parts = self._split(SnapshotData(emb=data.emb, bandit=data.bandit))
        wrote = False
        for chain, store in self.stores.items():
            if chain is not None:
                wrote |= store.write_image(parts.get(chain, SnapshotData()))
        return wrote

    def drop(self) -> None:
        """Delete every key of the owned chains (tests, decommissioning)."""
        for store in self.stores.values():
            store.drop()


def _token(generations: list[str]) -> str:
    return ",".join(generations)


@dataclass(frozen=True)
class BucketedFull:
    """Every chain read in full: the head and each bucket, with its own stream position."""

    head: FullSnapshot
    buckets: dict[int, FullSnapshot]

    def chains(self) -> dict[Chain, FullSnapshot]:
        out: dict[Chain, FullSnapshot] = {None: self.head}
        out.update(self.buckets)
        return out

    def merged(self) -> FullSnapshot:
        """One snapshot as the unbucketed layout would hold it (what a replica scores with).

        The bandit header is the newest any chain carries: buckets update it with their rows,
        the head only with the dense weights.
        """
        emb: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for slot, dim in self.head.meta.slots.items():
            parts = [f.emb[slot] for f in self.buckets.values() if slot in f.emb]
            emb[slot] = ((np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts])) if parts
                         else (_NO_IDS, np.empty((0, dim), np.float32)))
        bandits = [f.bandit for f in self.buckets.values() if f.bandit is not None]
        bandit = (BanditRows(*(np.concatenate([getattr(b, a) for b in bandits])
                               for a in ("item_ids", "t", "d", "b"))) if bandits else None)
        headers = [f.meta.bandit for f in self.chains().values() if f.meta.bandit is not None]
        meta = self.head.meta
        if headers:
            newest = max(headers, key=lambda h: h.version)
            meta = SnapshotMeta(**{**meta.__dict__, "bandit": newest})
        if meta.bandit is not None and bandit is None:
            c = meta.bandit.n_clusters
            bandit = BanditRows(_NO_IDS, np.empty(0), np.empty((0, c)), np.empty((0, c)))
        source = "image" if all(f.source == "image" for f in self.buckets.values()) else "scan"
        return FullSnapshot(meta, self.head.stream_id, emb, self.head.dense, bandit,
                            self.head.centroids, source=source)


def _complete(head: FullSnapshot | None, parts: dict[int, FullSnapshot | None]
              ) -> BucketedFull | None:
    if head is None or any(p is None for p in parts.values()):
        return None  # some chain not published yet (another rank still starting)
    return BucketedFull(head, {k: p for k, p in parts.items() if p is not None})


class BucketedReader:
    """Synchronous reads of every chain of a bucketed model (tests, tools)."""

    def __init__(self, client: redis.Redis, model_name: str, n_buckets: int) -> None:
        self.r = client
        self.readers: dict[Chain, SnapshotReader] = {None: SnapshotReader(client, model_name)}
        for k in range(n_buckets):
            self.readers[k] = SnapshotReader(client, model_name, bucket=k)

    def read_full(self) -> BucketedFull | None:
        """Every chain; None until every chain has a snapshot."""
        head = self.readers[None].read_full()
        parts = {k: r.read_full() for k, r in self.readers.items() if k is not None}
        return _complete(head, parts)  # type: ignore[arg-type]


class AsyncBucketedReader:
    """The service's reads of every chain: full loads in parallel, updates by polling.

    A blocking XREAD cannot span chains in a cluster (their streams live in different slots),
    so :meth:`read_updates` reads every stream without blocking in one pipeline (one round
    trip per master) and the follower polls.
    """

    def __init__(self, client: aredis.Redis, model_name: str, n_buckets: int) -> None:
        self.r = client
        self.readers: dict[Chain, AsyncSnapshotReader] = {
            None: AsyncSnapshotReader(client, model_name)}
        for k in range(n_buckets):
            self.readers[k] = AsyncSnapshotReader(client, model_name, bucket=k)

    async def read_full(self) -> BucketedFull | None:
        """Every chain (each consistent with its own stream position); None if one is missing."""
        chains = list(self.readers)
        got = await asyncio.gather(*(self.readers[c].read_full() for c in chains))
        by_chain = dict(zip(chains, got, strict=True))
        head = by_chain.pop(None)
        return _complete(head, by_chain)  # type: ignore[arg-type]

    async def read_updates(self, positions: Mapping[Chain, bytes], count: int = 64
                           ) -> dict[Chain, list[Update]]:
        """Entries after each chain's position, without blocking."""
        chains = list(positions)
        async with self.r.pipeline(transaction=False) as pipe:
            for c in chains:
                pipe.xread({self.readers[c].keys.updates: positions[c]}, count=count)
            results: list[Any] = await pipe.execute()
        return {c: [Update.decode(i, f) for _, entries in (res or []) for i, f in entries]
                for c, res in zip(chains, results, strict=True)}

    async def fetch_delta(self, chain: Chain, update: Update, meta: SnapshotMeta,
                          current_dense: int, current_centroids: int) -> DeltaRows:
        return await self.readers[chain].fetch_delta(update, meta, current_dense,
                                                     current_centroids)


__all__ = [
    "AsyncBucketedReader", "BucketedFull", "BucketedReader", "BucketedStore", "Chain",
    "split_by_bucket",
]  # fmt: skip
