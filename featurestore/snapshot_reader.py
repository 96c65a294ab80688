"""Reading a snapshot back: the full load of a replica that starts from Redis alone, the update
stream, and the rows one update announced.

The read plans (which commands to send, how to assemble their results) are shared by the
synchronous :class:`SnapshotReader` (the publisher, tests, tools) and the service's
:class:`AsyncSnapshotReader`, so both read the layout exactly the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Generator, Iterator
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
from freshrec.background import in_background

log = logging.getLogger("freshrec.snapshot")

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
# A replica's full read rests as long as each round took before sending the next. Walking the
# hashes of a 1 M-row table (the scan, without an image) costs Redis seconds of a core, on cores
# that answer requests, and the replica serves its last snapshot meanwhile anyway: each reading
# replica keeps Redis at most half busy (measured in docs/serving.md). An image read is a few
# rounds of memory copies, for which resting costs a few tenths of a second at most.
FULL_READ_PAUSE_RATIO = 1.0
SCAN_COUNT = 10_000  # rows per HSCAN step: ~0.7 MB replies, short stalls of Redis itself
# An image older than this many stream entries is not worth catching up from (~10 min at 5
# publishes/s; the publisher writes one every ``trainer_snapshot_image_interval_s``).
MAX_CATCHUP_ENTRIES = 3_000
IMAGE_FIELDS_PER_ROUND = 4  # image chunks (<= 4 MB each) per round trip
MAX_IMAGE_CHUNKS = 1 << 20

Command = tuple[str, tuple]
# A read plan: yields rounds of commands (sent as one pipeline), receives their results, and
# finally returns a zero-argument callable doing the CPU-bound assembly (which the async
# reader runs on a worker thread).
Plan = Generator[list[Command], list[Any], Callable[[], Any]]


def _scan_plan(keys: Keys, meta: SnapshotMeta, stream_id: bytes) -> Plan:
    """Every row by walking the chain's hashes (when there is no usable image)."""
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


def _full_plan(keys: Keys, meta: SnapshotMeta, stream_id: bytes) -> Plan:
    """The chain's image plus the rows the entries after it announced; a scan without one.

    An image is usable when its own stream entry is still in the stream (so every entry after
    it is too), it is at most :data:`MAX_CATCHUP_ENTRIES` entries old, and its chunks and the
    changelogs of those entries still exist; anything else falls back to the scan. Rows an
    entry after the image wrote or deleted are fetched from the hashes as they are now (so
    possibly newer, or gone: deleted), exactly like following those entries would.
    """
    img = meta.image
    if img is None or img.version > meta.version or stream_id == b"0-0":
        return (yield from _scan_plan(keys, meta, stream_id))
    key = keys.image(meta.generation, img.version)
    own, entries, manifest_raw, dense_fields, cent_fields = yield [
        ("xrange", (keys.updates, img.stream_id, img.stream_id)),
        ("xrange", (keys.updates, b"(" + img.stream_id, stream_id, MAX_CATCHUP_ENTRIES + 1)),
        ("hget", (key, "manifest")),
        ("hgetall", (keys.dense(meta.dense_version),)),
        ("hgetall", (keys.centroids,)),
    ]
    updates = [Update.decode(i, f) for i, f in entries]
    manifest = _image_manifest(manifest_raw, meta, img.version)
    if (manifest is None or not own or len(updates) > MAX_CATCHUP_ENTRIES
            or Update.decode(*own[0]).version != img.version
            or any(u.generation != meta.generation for u in updates)):
        return (yield from _scan_plan(keys, meta, stream_id))
    deltas = [u for u in updates if u.kind == "delta"]  # "full" of this generation: no rows
    logged = [i for i, u in enumerate(deltas) if u.changelog]
    if logged:
        got = yield [("hgetall", (deltas[i].changelog,)) for i in logged]
        if not all(got):  # a changelog expired: the rows it named are unknown
            return (yield from _scan_plan(keys, meta, stream_id))
        for i, fields in zip(logged, got, strict=True):
            deltas[i] = deltas[i].with_changelog(fields)
    changed = _changed_since(deltas, meta)
    emb_chunks, bandit_chunks = manifest
    names = [(slot, f"e:{slot}:{i}") for slot, n in emb_chunks.items() for i in range(n)]
    names += [("", f"b:{i}") for i in range(bandit_chunks)]
    blobs: dict[str, list[bytes]] = {}
    for start in range(0, len(names), IMAGE_FIELDS_PER_ROUND):
        batch = names[start : start + IMAGE_FIELDS_PER_ROUND]
        got = yield [("hget", (key, name)) for _, name in batch]
        if any(g is None for g in got):  # superseded and expired while we read it
            return (yield from _scan_plan(keys, meta, stream_id))
        for (group, _), blob in zip(batch, got, strict=True):
            blobs.setdefault(group, []).append(blob)
    fetch = _RowFetch(keys, meta, meta.generation, changed)
    results = (yield fetch.cmds) if fetch.cmds else []

    def assemble() -> FullSnapshot:
        if not dense_fields and meta.dense_version:
            raise SnapshotFormatError(f"dense weights version {meta.dense_version} missing")
        present, _ = fetch.decode(iter(results))
        dtype = np.dtype(meta.row_dtype).newbyteorder("<")
        emb = {}
        for slot, dim in meta.slots.items():
            ids, rows = decode_records(blobs.get(slot, []), dim, dtype)
            ids, rows = _patched(ids, rows, changed.get(slot), present.get(slot))
            emb[slot] = (ids, rows.astype(np.float32, copy=False))
        bandit = None
        if meta.bandit is not None:
            width = 1 + 2 * meta.bandit.n_clusters
            ids, packed = decode_records(blobs.get("", []), width, F64)
            ids, packed = _patched(ids, packed, changed.get(""), present.get(""))
            bandit = bandit_rows(ids, packed, meta.bandit.n_clusters)
        centroids = decode_arrays(cent_fields) if cent_fields else None
        dense = decode_arrays(dense_fields) if dense_fields else {}
        return FullSnapshot(meta, stream_id, emb, dense, bandit, centroids, source="image")

    return assemble


def _image_manifest(raw: bytes | None, meta: SnapshotMeta, version: int
                    ) -> tuple[dict[str, int], int] | None:
    """(chunks per slot, bandit chunks) of an image, or None when it is gone, not this one or
    unusable. An image is only a shortcut: a damaged one must not keep replicas from loading
    the rows, so it is logged and the read walks the hashes instead."""
    if raw is None:
        return None
    try:
        m = json.loads(raw)
        emb = {str(k): int(v) for k, v in m["emb"].items()}
        bandit = int(m["bandit"])
        ok = int(m["version"]) == version
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("unusable image manifest (%r): reading every row instead", exc)
        return None
    if ok and (any(k not in meta.slots for k in emb) or any(
            not 0 <= n <= MAX_IMAGE_CHUNKS for n in (*emb.values(), bandit))):
        log.warning("image manifest does not fit the meta (%r): reading every row instead",
                    raw[:200])
        return None
    return (emb, bandit) if ok else None


def _changed_since(deltas: list[Update], meta: SnapshotMeta) -> dict[str, np.ndarray]:
    """Per slot ("" for the bandit) the sorted IDs any of ``deltas`` wrote or deleted."""
    parts: dict[str, list[np.ndarray]] = {}
    for u in deltas:
        for group in (u.emb, u.deleted):
            for slot, ids in group.items():
                if slot in meta.slots:
                    parts.setdefault(slot, []).append(ids)
        if len(u.bandit_ids) and meta.bandit is not None:
            parts.setdefault("", []).append(u.bandit_ids)
    return {g: np.unique(np.concatenate(p)) for g, p in parts.items()}


def _patched(ids: np.ndarray, rows: np.ndarray, changed: np.ndarray | None,
             fetched: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Image rows with every changed ID replaced by its fetched row (absent: deleted)."""
    if changed is None or not len(changed):
        return ids, rows
    at = np.searchsorted(ids, changed)  # ids are sorted: m lookups, not a sort of all n
    inside = at < len(ids)
    at = at[inside][ids[at[inside]] == changed[inside]]
    keep = np.ones(len(ids), dtype=bool)
    keep[at] = False
    ids, rows = ids[keep], rows[keep]
    if fetched is None or not len(fetched[0]):
        return ids, rows
    order = np.argsort(fetched[0])  # a few rows into a big sorted array: no full re-sort
    got_ids, got_rows = fetched[0][order], fetched[1][order].astype(rows.dtype, copy=False)
    at = np.searchsorted(ids, got_ids)
    return np.insert(ids, at, got_ids), np.insert(rows, at, got_rows, axis=0)


class _RowFetch:
    """Rows of given IDs from the chain's hashes: one Lua HMGET per shard, decoded together."""

    def __init__(self, keys: Keys, meta: SnapshotMeta, generation: str,
                 ids: dict[str, np.ndarray], n_clusters: int | None = None) -> None:
        dtype = np.dtype(meta.row_dtype).newbyteorder("<")
        if n_clusters is None:
            n_clusters = meta.bandit.n_clusters if meta.bandit is not None else 0
        self.cmds: list[Command] = []
        self.groups: list[tuple[str, np.ndarray, int, np.dtype]] = []
        for group, group_ids in ids.items():
            if not len(group_ids):
                continue
            if group:
                n_shards, width, dt = meta.emb_shards, meta.slots[group], dtype
            else:
                n_shards, width, dt = meta.bandit_shards, 1 + 2 * n_clusters, F64
            shards = shard_of(group_ids, n_shards)
            for s in np.unique(shards):
                sel = group_ids[shards == s]
                key = (keys.emb(generation, group, int(s)) if group
                       else keys.bandit(generation, int(s)))
                self.cmds.append(("eval", (_GET_ROWS, 1, key, pack_ids(sel),
                                           width * dt.itemsize)))
                self.groups.append((group, sel, width, dt))

    def decode(self, results: Iterator[Any]
               ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, list[np.ndarray]]]:
        """(present rows per group, absent IDs per group), consuming one result per command."""
        present: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        absent: dict[str, list[np.ndarray]] = {}
        for group, ids, width, dt in self.groups:
            got, rows, missing = decode_found_rows(ids, *next(results), width, dt)
            present.setdefault(group, []).append((got, rows))
            absent.setdefault(group, []).append(missing)
        joined = {g: (np.concatenate([p[0] for p in parts]),
                      np.concatenate([p[1] for p in parts])) for g, parts in present.items()}
        return joined, absent


def _delta_plan(keys: Keys, meta: SnapshotMeta, update: Update, current_dense: int,
                current_centroids: int) -> Plan:
    if update.changelog:
        [fields] = yield [("hgetall", (update.changelog,))]
        if not fields:
            raise SnapshotFormatError(f"changelog {update.changelog} expired")
        update = update.with_changelog(fields)
    n_clusters = update.bandit_header.n_clusters if update.bandit_header is not None else 0
    wanted = {slot: ids for slot, ids in update.emb.items() if slot in meta.slots}
    if len(update.bandit_ids) and update.bandit_header is not None:
        wanted[""] = update.bandit_ids
    fetch = _RowFetch(keys, meta, update.generation, wanted, n_clusters)
    cmds = list(fetch.cmds)
    want_dense = update.dense_version != current_dense
    if want_dense:
        cmds.append(("hgetall", (keys.dense(update.dense_version),)))
    want_centroids = update.centroids_version != current_centroids
    if want_centroids:
        cmds.append(("hgetall", (keys.centroids,)))
    results = (yield cmds) if cmds else []

    def assemble() -> DeltaRows:
        it = iter(results)
        joined, absent = fetch.decode(it)
        deleted: dict[str, list[np.ndarray]] = {s: [ids] for s, ids in update.deleted.items()}
        for group, missing in absent.items():
            if group:
                deleted.setdefault(group, []).extend(missing)
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


def _run(r: redis.Redis, plan: Plan, pause_ratio: float = 0.0) -> Callable[[], Any]:
    """Drive a plan over a synchronous client, resting ``pause_ratio`` x each round's time
    after it (as :func:`_arun`)."""
    try:
        cmds = next(plan)
        while True:
            started = time.perf_counter()
            pipe = r.pipeline(transaction=False)
            _queue(pipe, cmds)
            try:
                results = pipe.execute()
            except redis.ResponseError as exc:
                raise SnapshotFormatError(str(exc)) from None
            if pause_ratio > 0:
                time.sleep(pause_ratio * (time.perf_counter() - started))
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

    def read_full(self, pause_ratio: float = 0.0) -> FullSnapshot | None:
        """Everything, consistent as of the returned meta (plus possibly newer rows).

        ``pause_ratio``: rest that many times each round trip's duration after it, so a big
        read leaves Redis time for everyone else (``FULL_READ_PAUSE_RATIO``).
        """
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(self.keys.meta)
        pipe.xrevrange(self.keys.updates, count=1)
        raw_meta, last = pipe.execute()
        meta = SnapshotMeta.decode(raw_meta)
        if meta is None:
            return None
        return _run(self.r, _full_plan(self.keys, meta, last[0][0] if last else b"0-0"),
                    pause_ratio)()

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
                 bucket: int | None = None, full_read_pause_ratio: float = FULL_READ_PAUSE_RATIO,
                 bulk_client: redis.Redis | None = None) -> None:
        self.r = client
        self.keys = Keys(model_name, bucket)
        self.full_read_pause_ratio = full_read_pause_ratio
        # Full reads over a synchronous client on the background thread, when given: parsing a
        # 1 M-row snapshot's replies with redis-py's asyncio parser took ~0.1 s of the event
        # loop per reload (copying multi-megabyte bulk strings through StreamReader), time every
        # request on that loop waited for. The blocking client parses into one buffer and
        # releases the GIL while it waits on the socket.
        self.bulk = None if bulk_client is None else SnapshotReader(bulk_client, model_name,
                                                                     bucket=bucket)

    async def read_meta(self) -> SnapshotMeta | None:
        return SnapshotMeta.decode(await self.r.hgetall(self.keys.meta))

    async def read_full(self) -> FullSnapshot | None:
        """Meta and the stream position atomically, then every key of that generation."""
        if self.bulk is not None:
            return await in_background(self.bulk.read_full, self.full_read_pause_ratio)
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
        # Decoding a big snapshot is CPU work: off the event loop, at lower priority
        # (freshrec.background; numpy releases the GIL).
        return await in_background(assemble)

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
