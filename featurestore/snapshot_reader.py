"""Reading a snapshot back: the full load of a replica that starts from Redis alone, the update
stream, and the rows one update announced.

The read plans (which commands to send, how to assemble their results) are shared by the
synchronous :class:`SnapshotReader` (the publisher, tests, tools) and the service's
:class:`AsyncSnapshotReader`, so both read the layout exactly the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis

from featurestore.snapshot_codec import (
    F64,
    SnapshotFormatError,
    decode_arrays,
    decode_found_rows,
    decode_records,
    pack_ids,
)
from featurestore.snapshot_keys import Keys, shard_of
from featurestore.snapshot_types import (
    DeltaRows,
    FullSnapshot,
    SnapshotMeta,
    Update,
    bandit_rows,
)

# Row reads run as Lua next to the data and answer with one byte string per call (fixed-width
# records, every length checked there), not one reply per field: a 1 M-row full read is a
# hundred replies of ~1 MB that numpy decodes in place, instead of two million Python objects
# parsed and joined while the service's event loop waits.
_SCAN_ROWS = """
local r = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local kv, w = r[2], tonumber(ARGV[3])
for i = 1, #kv, 2 do
  if #kv[i] ~= 8 or #kv[i + 1] ~= w then
    return redis.error_reply('row of the wrong size in ' .. KEYS[1])
  end
end
return {r[1], table.concat(kv)}
"""
_GET_ROWS = """
local ids, w = ARGV[1], tonumber(ARGV[2])
local n = #ids / 8
local found, vals = {}, {}
for s = 0, n - 1, 1000 do
  local fields = {}
  for i = s, math.min(s + 1000, n) - 1 do
    fields[#fields + 1] = string.sub(ids, 8 * i + 1, 8 * i + 8)
  end
  local got = redis.call('HMGET', KEYS[1], unpack(fields))
  for j = 1, #fields do
    local v = got[j]
    if v then
      if #v ~= w then return redis.error_reply('row of the wrong size in ' .. KEYS[1]) end
      found[#found + 1] = '1'
      vals[#vals + 1] = v
    else
      found[#found + 1] = '0'
    end
  end
end
return {table.concat(found), table.concat(vals)}
"""
# A replica's full read rests as long as each round took before sending the next: Redis walking
# a 1 M-row hash costs seconds of a core, on cores that answer requests, and the replica serves
# its last snapshot meanwhile anyway. Each reading replica keeps Redis at most half busy; a
# reload takes twice as long (measured in docs/serving.md).
FULL_READ_PAUSE_RATIO = 1.0
SCAN_COUNT = 10_000  # rows per HSCAN step: ~0.7 MB replies, short stalls of Redis itself

Command = tuple[str, tuple]
# A read plan: yields rounds of commands (sent as one pipeline), receives their results, and
# finally returns a zero-argument callable doing the CPU-bound assembly (which the async
# reader runs on a worker thread).
Plan = Generator[list[Command], list[Any], Callable[[], Any]]


def _full_plan(keys: Keys, meta: SnapshotMeta, stream_id: bytes) -> Plan:
    dtype = np.dtype(meta.row_dtype).newbyteorder("<")
    bandit_width = 1 + 2 * meta.bandit.n_clusters if meta.bandit is not None else 0
    # (group, hash key, values per row, dtype): group is a slot name, or "" for the bandit
    scans: list[tuple[str, str, int, np.dtype]] = [
        (slot, keys.emb(meta.generation, slot, s), dim, dtype)
        for slot, dim in meta.slots.items() for s in range(meta.emb_shards)]
    if meta.bandit is not None:
        scans += [("", keys.bandit(meta.generation, s), bandit_width, F64)
                  for s in range(meta.bandit_shards)]
    blobs: dict[str, list[bytes]] = {g: [] for g, *_ in scans}
    cursors = {i: b"0" for i in range(len(scans))}
    first = True
    dense_fields: dict[bytes, bytes] = {}
    cent_fields: dict[bytes, bytes] = {}
    while cursors or first:  # a chain without rows (the bucketed head) still reads its blobs
        order = list(cursors)
        cmds: list[Command] = [
            ("eval", (_SCAN_ROWS, 1, scans[i][1], cursors[i], SCAN_COUNT,
                      scans[i][2] * scans[i][3].itemsize)) for i in order]
        if first:
            cmds += [("hgetall", (keys.dense(meta.dense_version),)),
                     ("hgetall", (keys.centroids,))]
        results = yield cmds
        if first:
            dense_fields, cent_fields = results[-2], results[-1]
            results = results[:-2]
            first = False
        for i, (cursor, blob) in zip(order, results, strict=True):
            blobs[scans[i][0]].append(blob)
            if cursor in (b"0", 0, "0"):
                del cursors[i]
            else:
                cursors[i] = cursor

    def assemble() -> FullSnapshot:
        if not dense_fields and meta.dense_version:  # 0: a bucket chain, no dense weights
            raise SnapshotFormatError(f"dense weights version {meta.dense_version} missing")
        emb = {}
        for slot, dim in meta.slots.items():
            ids, rows = decode_records(blobs.get(slot, []), dim, dtype)
            emb[slot] = (ids, rows.astype(np.float32))
        bandit = None
        if meta.bandit is not None:
            ids, packed = decode_records(blobs.get("", []), bandit_width, F64)
            bandit = bandit_rows(ids, packed, meta.bandit.n_clusters)
        centroids = decode_arrays(cent_fields) if cent_fields else None
        dense = decode_arrays(dense_fields) if dense_fields else {}
        return FullSnapshot(meta, stream_id, emb, dense, bandit, centroids)

    return assemble


def _delta_plan(keys: Keys, meta: SnapshotMeta, update: Update, current_dense: int,
                current_centroids: int) -> Plan:
    if update.changelog:
        [fields] = yield [("hgetall", (update.changelog,))]
        if not fields:
            raise SnapshotFormatError(f"changelog {update.changelog} expired")
        update = update.with_changelog(fields)
    dtype = np.dtype(meta.row_dtype).newbyteorder("<")
    n_clusters = update.bandit_header.n_clusters if update.bandit_header is not None else 0
    groups: list[tuple[str, np.ndarray, int, np.dtype]] = []
    cmds: list[Command] = []
    lists = [(slot, ids, meta.emb_shards, meta.slots[slot], dtype)
             for slot, ids in update.emb.items() if slot in meta.slots and len(ids)]
    if len(update.bandit_ids) and update.bandit_header is not None:
        lists.append(("", update.bandit_ids, meta.bandit_shards, 1 + 2 * n_clusters, F64))
    for group, ids, n_shards, width, dt in lists:
        shards = shard_of(ids, n_shards)
        for s in np.unique(shards):
            sel = ids[shards == s]
            key = (keys.emb(update.generation, group, int(s)) if group
                   else keys.bandit(update.generation, int(s)))
            cmds.append(("eval", (_GET_ROWS, 1, key, pack_ids(sel), width * dt.itemsize)))
            groups.append((group, sel, width, dt))
    want_dense = update.dense_version != current_dense
    if want_dense:
        cmds.append(("hgetall", (keys.dense(update.dense_version),)))
    want_centroids = update.centroids_version != current_centroids
    if want_centroids:
        cmds.append(("hgetall", (keys.centroids,)))
    results = (yield cmds) if cmds else []

    def assemble() -> DeltaRows:
        it = iter(results)
        present: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        deleted: dict[str, list[np.ndarray]] = {s: [ids] for s, ids in update.deleted.items()}
        for group, ids, width, dt in groups:
            got, rows, absent = decode_found_rows(ids, *next(it), width, dt)
            present.setdefault(group, []).append((got, rows))
            if group and len(absent):
                deleted.setdefault(group, []).append(absent)
        joined = {g: (np.concatenate([p[0] for p in parts]),
                      np.concatenate([p[1] for p in parts])) for g, parts in present.items()}
        bandit = None
        if "" in joined:
            bandit = bandit_rows(*joined.pop(""), n_clusters)
        emb = {slot: (ids, rows.astype(np.float32)) for slot, (ids, rows) in joined.items()}
        dense = centroids = None
        if want_dense:
            fields = next(it)
            if not fields:
                raise SnapshotFormatError(f"dense version {update.dense_version} missing")
            dense = decode_arrays(fields)
        if want_centroids:
            fields = next(it)
            centroids = decode_arrays(fields) if fields else None
        return DeltaRows(emb, {k: np.concatenate(v) for k, v in deleted.items()}, bandit,
                         dense, centroids)

    return assemble


def _queue(pipe: Any, cmds: list[Command]) -> None:
    for name, args in cmds:
        if name == "eval":  # a cluster pipeline has no eval(); the raw command routes by key
            pipe.execute_command("EVAL", *args)
        else:
            getattr(pipe, name)(*args)


def _run(r: redis.Redis, plan: Plan) -> Callable[[], Any]:
    """Drive a plan over a synchronous client."""
    try:
        cmds = next(plan)
        while True:
            pipe = r.pipeline(transaction=False)
            _queue(pipe, cmds)
            try:
                results = pipe.execute()
            except redis.ResponseError as exc:
                raise SnapshotFormatError(str(exc)) from None
            cmds = plan.send(results)
    except StopIteration as done:
        return done.value


async def _arun(r: aredis.Redis, plan: Plan, pause_ratio: float = 0.0) -> Callable[[], Any]:
    """Drive a plan over an asyncio client, resting ``pause_ratio`` x each round's time after it."""
    try:
        cmds = next(plan)
        while True:
            started = time.perf_counter()
            async with r.pipeline(transaction=False) as pipe:
                _queue(pipe, cmds)
                try:
                    results = await pipe.execute()
                except redis.ResponseError as exc:
                    raise SnapshotFormatError(str(exc)) from None
            if pause_ratio > 0:
                await asyncio.sleep(pause_ratio * (time.perf_counter() - started))
            cmds = plan.send(results)
    except StopIteration as done:
        return done.value


class SnapshotReader:
    """Synchronous reads of one model's snapshot."""

    def __init__(self, client: redis.Redis, model_name: str, *,
                 bucket: int | None = None) -> None:
        self.r = client
        self.model = model_name
        self.bucket = bucket
        self.keys = Keys(model_name, bucket)

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
        return _run(self.r, _full_plan(self.keys, meta, last[0][0] if last else b"0-0"))()

    def read_updates(self, after: bytes, count: int = 100, block_ms: int | None = None
                     ) -> list[Update]:
        """Entries after stream id ``after`` (blocking up to ``block_ms`` when given)."""
        res = self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        return [Update.decode(i, f) for _, entries in (res or []) for i, f in entries]

    def fetch_delta(self, update: Update, meta_like: SnapshotMeta, current_dense: int,
                    current_centroids: int) -> DeltaRows:
        """The rows an entry announced (after its changelog, when it has one)."""
        return _run(self.r, _delta_plan(self.keys, meta_like, update, current_dense,
                                        current_centroids))()


class AsyncSnapshotReader:
    """The service's side: the same reads over ``redis.asyncio`` (blocking XREAD follows)."""

    def __init__(self, client: aredis.Redis, model_name: str, *,
                 bucket: int | None = None, full_read_pause_ratio: float = FULL_READ_PAUSE_RATIO
                 ) -> None:
        self.r = client
        self.keys = Keys(model_name, bucket)
        self.full_read_pause_ratio = full_read_pause_ratio

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
        assemble = await _arun(self.r, _full_plan(self.keys, meta,
                                                  last[0][0] if last else b"0-0"),
                               self.full_read_pause_ratio)
        # Decoding a big snapshot is CPU work: off the event loop (numpy releases the GIL).
        return await asyncio.to_thread(assemble)

    async def read_updates(self, after: bytes, count: int = 100, block_ms: int | None = None
                           ) -> list[Update]:
        res = await self.r.xread({self.keys.updates: after}, count=count, block=block_ms)
        return [Update.decode(i, f) for _, entries in (res or []) for i, f in entries]

    async def fetch_delta(self, update: Update, meta: SnapshotMeta, current_dense: int,
                          current_centroids: int) -> DeltaRows:
        """The rows an entry announced, decoded (a few numpy calls whatever its size)."""
        return (await _arun(self.r, _delta_plan(self.keys, meta, update, current_dense,
                                                current_centroids)))()


__all__ = ["AsyncSnapshotReader", "SnapshotReader"]
