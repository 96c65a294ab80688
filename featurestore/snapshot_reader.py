"""Reading a snapshot back: the full load of a replica that starts from Redis alone, the update
stream, and the rows one update announced.

The read plans (which commands to send, how to assemble their results) are shared by the
synchronous :class:`SnapshotReader` (the publisher, tests, tools) and the service's
:class:`AsyncSnapshotReader`, so both read the layout exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis

from featurestore.snapshot_codec import (
    SnapshotFormatError,
    decode_arrays,
    decode_rows,
    id_fields,
)
from featurestore.snapshot_keys import Keys, shard_of
from featurestore.snapshot_types import (
    DeltaRows,
    FullSnapshot,
    SnapshotMeta,
    Update,
    decode_bandit,
)


def _full_read_commands(keys: Keys, meta: SnapshotMeta) -> list[tuple[str, tuple]]:
    cmds: list[tuple[str, tuple]] = []
    for slot in meta.slots:
        for s in range(meta.emb_shards):
            cmds.append(("hgetall", (keys.emb(meta.generation, slot, s),)))
    cmds.append(("hgetall", (keys.dense(meta.dense_version),)))
    cmds.append(("hgetall", (keys.centroids,)))
    if meta.bandit is not None:
        for s in range(meta.bandit_shards):
            cmds.append(("hgetall", (keys.bandit(meta.generation, s),)))
    return cmds


def _assemble_full(meta: SnapshotMeta, stream_id: bytes, results: list[Any]) -> FullSnapshot:
    it = iter(results)
    dtype = np.dtype(meta.row_dtype).newbyteorder("<")
    emb = {}
    for slot, dim in meta.slots.items():
        keys: list[bytes] = []
        values: list[bytes] = []
        for _ in range(meta.emb_shards):
            h = next(it)
            keys.extend(h.keys())
            values.extend(h.values())
        ids, rows = decode_rows(keys, values, dim, dtype)
        emb[slot] = (ids, rows.astype(np.float32))
    dense_fields = next(it)
    if not dense_fields:
        raise SnapshotFormatError(f"dense weights version {meta.dense_version} missing")
    dense = decode_arrays(dense_fields)
    cent_fields = next(it)
    centroids = decode_arrays(cent_fields) if cent_fields else None
    bandit = None
    if meta.bandit is not None:
        keys, values = [], []
        for _ in range(meta.bandit_shards):
            h = next(it)
            keys.extend(h.keys())
            values.extend(h.values())
        bandit = decode_bandit(keys, values, meta.bandit.n_clusters)
    return FullSnapshot(meta, stream_id, emb, dense, bandit, centroids)


@dataclass
class _DeltaPlan:
    commands: list[tuple[str, tuple]]
    meta: SnapshotMeta
    update: Update
    groups: list[tuple[str, np.ndarray]]  # (slot or "" for bandit, ids in command order)
    want_dense: bool
    want_centroids: bool

    def assemble(self, results: list[Any]) -> DeltaRows:
        it = iter(results)
        dtype = np.dtype(self.meta.row_dtype).newbyteorder("<")
        emb_k: dict[str, list[bytes]] = {}
        emb_v: dict[str, list[bytes]] = {}
        gone: dict[str, list[np.ndarray]] = {s: [ids] for s, ids in self.update.deleted.items()}
        bk: list[bytes] = []
        bv: list[bytes] = []
        for slot, ids in self.groups:
            values = next(it)
            present = [v is not None for v in values]
            keys = id_fields(ids)
            ks = [k for k, p in zip(keys, present, strict=True) if p]
            vs = [v for v in values if v is not None]
            if slot:
                emb_k.setdefault(slot, []).extend(ks)
                emb_v.setdefault(slot, []).extend(vs)
                if not all(present):
                    gone.setdefault(slot, []).append(ids[~np.array(present)])
            else:
                bk.extend(ks)
                bv.extend(vs)
        emb = {}
        for slot, ks in emb_k.items():
            ids, rows = decode_rows(ks, emb_v[slot], self.meta.slots[slot], dtype)
            emb[slot] = (ids, rows.astype(np.float32))
        bandit = None
        if bk and self.update.bandit_header is not None:
            bandit = decode_bandit(bk, bv, self.update.bandit_header.n_clusters)
        dense = centroids = None
        if self.want_dense:
            fields = next(it)
            if not fields:
                raise SnapshotFormatError(f"dense version {self.update.dense_version} missing")
            dense = decode_arrays(fields)
        if self.want_centroids:
            fields = next(it)
            centroids = decode_arrays(fields) if fields else None
        deleted = {k: np.concatenate(v) for k, v in gone.items()}
        return DeltaRows(emb, deleted, bandit, dense, centroids)


def _delta_read_commands(keys: Keys, meta: SnapshotMeta, update: Update, current_dense: int,
                         current_centroids: int) -> _DeltaPlan:
    cmds: list[tuple[str, tuple]] = []
    groups: list[tuple[str, np.ndarray]] = []
    for slot, ids in update.emb.items():
        if slot not in meta.slots or not len(ids):
            continue
        shards = shard_of(ids, meta.emb_shards)
        for s in np.unique(shards):
            sel = ids[shards == s]
            cmds.append(("hmget", (keys.emb(update.generation, slot, int(s)),
                                   id_fields(sel))))
            groups.append((slot, sel))
    if len(update.bandit_ids):
        shards = shard_of(update.bandit_ids, meta.bandit_shards)
        for s in np.unique(shards):
            sel = update.bandit_ids[shards == s]
            cmds.append(("hmget", (keys.bandit(update.generation, int(s)),
                                   id_fields(sel))))
            groups.append(("", sel))
    want_dense = update.dense_version != current_dense
    if want_dense:
        cmds.append(("hgetall", (keys.dense(update.dense_version),)))
    want_centroids = update.centroids_version != current_centroids
    if want_centroids:
        cmds.append(("hgetall", (keys.centroids,)))
    return _DeltaPlan(cmds, meta, update, groups, want_dense, want_centroids)



class SnapshotReader:
    """Synchronous reads of one model's snapshot."""

    def __init__(self, client: redis.Redis, model_name: str) -> None:
        self.r = client
        self.model = model_name
        self.keys = Keys(model_name)

    # -- reads --

    def read_meta(self) -> SnapshotMeta | None:
        """The current meta, or None if there is no (complete) snapshot."""
        return SnapshotMeta.decode(self.r.hgetall(self.keys.meta))

    def current_generation(self) -> str | None:
        """One cheap round trip: the generation readers see (None: Redis lost the snapshot)."""
        g = self.r.hget(self.keys.meta, "generation")
        return g.decode() if g is not None else None

    def read_full(self) -> FullSnapshot | None:
        """Everything, consistent as of the returned meta (plus possibly newer rows)."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.keys.meta)
        pipe.xrevrange(self.keys.updates, count=1)
        raw_meta, last = pipe.execute()
        meta = SnapshotMeta.decode(raw_meta)
        if meta is None:
            return None
        pipe = self.r.pipeline(transaction=False)
        for cmd, args in _full_read_commands(self.keys, meta):
            getattr(pipe, cmd)(*args)
        return _assemble_full(meta, last[0][0] if last else b"0-0", pipe.execute())

    def read_updates(self, after: bytes, count: int = 100, block_ms: int | None = None
                     ) -> list[Update]:
        """Entries after stream id ``after`` (blocking up to ``block_ms`` when given)."""
        res = self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        return [Update.decode(i, f) for _, entries in (res or []) for i, f in entries]

    def fetch_delta(self, update: Update, meta_like: SnapshotMeta, current_dense: int,
                    current_centroids: int) -> DeltaRows:
        """The rows an entry announced, in one pipeline."""
        if update.changelog:
            fields = self.r.hgetall(update.changelog)
            if not fields:
                raise SnapshotFormatError(f"changelog {update.changelog} expired")
            update = update.with_changelog(fields)
        pipe = self.r.pipeline(transaction=False)
        plan = _delta_read_commands(self.keys, meta_like, update, current_dense,
                                    current_centroids)
        for cmd, args in plan.commands:
            getattr(pipe, cmd)(*args)
        return plan.assemble(pipe.execute())

    # -- writes --


class AsyncSnapshotReader:
    """The service's side: the same reads over ``redis.asyncio`` (blocking XREAD follows)."""

    def __init__(self, client: aredis.Redis, model_name: str) -> None:
        self.r = client
        self.keys = Keys(model_name)

    async def read_meta(self) -> SnapshotMeta | None:
        return SnapshotMeta.decode(await self.r.hgetall(self.keys.meta))

    async def read_full(self) -> FullSnapshot | None:
        """Meta and the stream position atomically, then every key of that generation."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.meta)
            pipe.xrevrange(self.keys.updates, count=1)
            raw_meta, last = await pipe.execute()
        meta = SnapshotMeta.decode(raw_meta)
        if meta is None:
            return None
        async with self.r.pipeline(transaction=False) as pipe:
            for cmd, args in _full_read_commands(self.keys, meta):
                getattr(pipe, cmd)(*args)
            results = await pipe.execute()
        return _assemble_full(meta, last[0][0] if last else b"0-0", results)

    async def read_updates(self, after: bytes, count: int = 100, block_ms: int | None = None
                           ) -> list[Update]:
        res = await self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        return [Update.decode(i, f) for _, entries in (res or []) for i, f in entries]

    async def fetch_delta(self, update: Update, meta: SnapshotMeta, current_dense: int,
                          current_centroids: int) -> DeltaRows:
        if update.changelog:
            fields = await self.r.hgetall(update.changelog)
            if not fields:
                raise SnapshotFormatError(f"changelog {update.changelog} expired")
            update = update.with_changelog(fields)
        plan = _delta_read_commands(self.keys, meta, update, current_dense, current_centroids)
        if not plan.commands:
            return plan.assemble([])
        async with self.r.pipeline(transaction=False) as pipe:
            for cmd, args in plan.commands:
                getattr(pipe, cmd)(*args)
            results = await pipe.execute()
        return plan.assemble(results)


__all__ = ["AsyncSnapshotReader", "SnapshotReader"]
