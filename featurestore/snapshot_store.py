"""The Redis snapshot layout: the one place that knows how a model's serving state sits in Redis.

The trainer's publisher writes through :class:`SnapshotStore`; every service replica reads the
same keys through :class:`AsyncSnapshotReader` (or the synchronous reads of
:class:`SnapshotStore`). All keys of one model share the hash tag ``{model}``, so they live in one
Redis Cluster slot and a publish can be one MULTI/EXEC transaction.

===========================================  ===============================================
key                                          contents
===========================================  ===============================================
``fr:{m}:meta``                              hash: ``version``, ``dense_version``,
                                             ``centroids_version``, ``schema_hash``,
                                             ``created``, ``updated``, ``generation``,
                                             ``row_dtype``, ``emb_shards``, ``bandit_shards``,
                                             ``slots`` (JSON name -> dim), ``bandit`` (JSON)
``fr:{m}:emb:{gen}:{slot}:{shard}``          hash: 8-byte LE int64 ID -> row bytes
``fr:{m}:bandit:{gen}:{shard}``              hash: 8-byte LE item ID -> float64 LE
                                             ``[t, d_0..d_C-1, b_0..b_C-1]``
``fr:{m}:dense:{dense_version}``             hash: ``manifest`` (JSON) + ``chunk:{i}`` (<=1 MB)
``fr:{m}:centroids``                         hash: ``manifest`` + ``chunk:{i}``
``fr:{m}:updates``                           stream of :class:`Update` entries (MAXLEN ~)
``fr:{m}:changelog:{version}``               hash: the ID lists of one big delta (expires)
===========================================  ===============================================

Why the generation is part of the row keys: a full snapshot of a big table cannot be one
transaction, so it is written under a fresh generation and made visible by one atomic switch of
``meta.generation``. A reader never sees half of a full snapshot; the old generation's keys
expire a couple of minutes later (long enough for a replica that is mid-load to finish).

Update protocol: every publish is one transaction that writes the rows first and then XADDs
the entry announcing them, with ``version`` and ``prev_version``. Versions only go up; a
reader applies entries whose ``prev_version`` equals its own version and reloads fully when
they do not chain (stream trimmed past it, a publisher restart, a new generation).

Nothing read from Redis is trusted code: arrays are ``np.frombuffer`` with explicit dtypes and
validated lengths, metadata is JSON; no pickle anywhere.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import redis.asyncio as aredis

CHUNK_BYTES = 1 << 20  # large values are split so no single Redis value exceeds ~1 MB
FULL_PIPELINE_FIELDS = 10_000  # fields per pipeline while writing a full snapshot
INLINE_ID_LIMIT = 4_096  # deltas announcing more IDs move their ID lists to a changelog key
STREAM_MAXLEN = 10_000  # ~33 min of history at 5 publishes/s for lagging replicas
OLD_GENERATION_TTL_S = 120
OLD_DENSE_TTL_S = 300
CHANGELOG_TTL_S = 600
ROW_DTYPES = ("float32", "float16")
_ID = np.dtype("<i8")
_F64 = np.dtype("<f8")


class SnapshotFormatError(ValueError):
    """Something in Redis does not have the shape the layout promises (corrupt or foreign)."""


# ---- encoding helpers ---------------------------------------------------------------------


def pack_ids(ids: np.ndarray) -> bytes:
    """int64 IDs as one little-endian byte string (8 bytes each)."""
    return np.ascontiguousarray(ids, dtype=_ID).tobytes()


def unpack_ids(raw: bytes | None) -> np.ndarray:
    """Inverse of :func:`pack_ids`, refusing lengths that are not a multiple of 8."""
    if not raw:
        return np.empty(0, dtype=np.int64)
    if len(raw) % 8:
        raise SnapshotFormatError(f"ID list of {len(raw)} bytes is not a multiple of 8")
    return np.frombuffer(raw, dtype=_ID).astype(np.int64)


def _split8(raw: bytes) -> list[bytes]:
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def shard_of(ids: np.ndarray, n_shards: int) -> np.ndarray:
    """Shard of each ID; hashed string IDs are uniform already, small ints spread by modulo."""
    return (np.asarray(ids, dtype=np.int64).view(np.uint64) % np.uint64(n_shards)).astype(
        np.int64
    )


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> dict[bytes, bytes]:
    """Named arrays -> hash fields: a JSON manifest plus raw little-endian chunks <= 1 MB."""
    entries, parts, offset = [], [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt.kind not in "fiub":
            raise TypeError(f"{name}: dtype {a.dtype} cannot be published")
        raw = a.astype(dt, copy=False).tobytes()
        entries.append({"name": name, "dtype": dt.str, "shape": list(a.shape),
                        "offset": offset, "nbytes": len(raw)})
        parts.append(raw)
        offset += len(raw)
    blob = b"".join(parts)
    chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
    out = {b"manifest": json.dumps({"arrays": entries, "chunks": len(chunks),
                                    "nbytes": len(blob)}).encode()}
    for i, c in enumerate(chunks):
        out[f"chunk:{i}".encode()] = c
    return out


_ALLOWED_DTYPES = {"<f4", "<f8", "<f2", "<i8", "<i4", "|u1", "|b1", "<u8", "|i1"}


def decode_arrays(fields: Mapping[bytes, bytes]) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_arrays`, validating every length against the manifest."""
    try:
        manifest = json.loads(fields[b"manifest"])
        n_chunks = int(manifest["chunks"])
        blob = b"".join(fields[f"chunk:{i}".encode()] for i in range(n_chunks))
    except (KeyError, ValueError, TypeError) as exc:
        raise SnapshotFormatError(f"bad array blob: {exc!r}") from None
    if len(blob) != manifest.get("nbytes"):
        raise SnapshotFormatError(f"array blob has {len(blob)} bytes, manifest says "
                                  f"{manifest.get('nbytes')}")
    out: dict[str, np.ndarray] = {}
    for e in manifest["arrays"]:
        dt = str(e["dtype"])
        if dt not in _ALLOWED_DTYPES:
            raise SnapshotFormatError(f"{e['name']}: dtype {dt} not allowed")
        dtype = np.dtype(dt)
        shape = tuple(int(s) for s in e["shape"])
        nbytes, off = int(e["nbytes"]), int(e["offset"])
        if nbytes != math.prod(shape) * dtype.itemsize or off < 0 or off + nbytes > len(blob):
            raise SnapshotFormatError(f"{e['name']}: {nbytes} bytes do not fit shape {shape}")
        out[str(e["name"])] = np.frombuffer(blob, dtype=dtype, count=math.prod(shape),
                                            offset=off).reshape(shape).copy()
    return out


def _decode_rows(keys: list[bytes], values: list[bytes], width: int, dtype: np.dtype
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Hash fields/values -> (ids int64, rows ``(n, width)`` of ``dtype``), lengths checked."""
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, width), dtype=dtype)
    kb, vb = b"".join(keys), b"".join(values)
    row_bytes = width * dtype.itemsize
    if len(kb) != 8 * n or len(vb) != row_bytes * n:
        raise SnapshotFormatError(f"rows of the wrong size (expected 8-byte IDs and "
                                  f"{row_bytes}-byte rows)")
    ids = np.frombuffer(kb, dtype=_ID).astype(np.int64)
    rows = np.frombuffer(vb, dtype=dtype).reshape(n, width)
    return ids, rows


# ---- what is stored -------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditHeader:
    """Scalars of the Diag-LinUCB statistics (the per-item rows live in the bandit hashes)."""

    n_clusters: int
    lam: float
    half_life_s: float
    version: int
    clock: float | None

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes | str) -> BanditHeader:
        d = json.loads(raw)
        return cls(int(d["n_clusters"]), float(d["lam"]), float(d["half_life_s"]),
                   int(d["version"]), None if d["clock"] is None else float(d["clock"]))


@dataclass(frozen=True)
class SnapshotMeta:
    """Decoded ``fr:{m}:meta``: which generation and versions are current, and the shapes."""

    version: int
    dense_version: int
    centroids_version: int
    schema_hash: str
    created: float
    updated: float
    generation: str
    row_dtype: str
    emb_shards: int
    bandit_shards: int
    slots: dict[str, int]
    bandit: BanditHeader | None

    @classmethod
    def decode(cls, raw: Mapping[bytes, bytes]) -> SnapshotMeta | None:
        """None when the hash is missing or incomplete (Redis lost data mid-way): republish."""
        try:
            g = {k.decode(): v.decode() for k, v in raw.items()}
            row_dtype = g["row_dtype"]
            if row_dtype not in ROW_DTYPES:
                raise SnapshotFormatError(f"row dtype {row_dtype!r}")
            return cls(
                version=int(g["version"]), dense_version=int(g["dense_version"]),
                centroids_version=int(g.get("centroids_version", "0")),
                schema_hash=g["schema_hash"], created=float(g["created"]),
                updated=float(g["updated"]), generation=g["generation"], row_dtype=row_dtype,
                emb_shards=int(g["emb_shards"]), bandit_shards=int(g["bandit_shards"]),
                slots={str(k): int(v) for k, v in json.loads(g["slots"]).items()},
                bandit=BanditHeader.from_json(g["bandit"]) if g.get("bandit") else None,
            )  # fmt: skip
        except KeyError:
            return None
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise SnapshotFormatError(f"bad meta: {exc!r}") from None


@dataclass(frozen=True)
class BanditRows:
    """Per-item Diag-LinUCB rows: ``d``, ``b`` float64 ``(n, C)``, ``t`` their event time."""

    item_ids: np.ndarray
    t: np.ndarray
    d: np.ndarray
    b: np.ndarray


@dataclass
class SnapshotData:
    """Everything a publish carries (a full snapshot has every field set)."""

    emb: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # ids, vectors
    deleted: dict[str, np.ndarray] = field(default_factory=dict)
    bandit: BanditRows | None = None
    bandit_header: BanditHeader | None = None
    dense: dict[str, np.ndarray] | None = None
    centroids: dict[str, np.ndarray] | None = None

    @property
    def n_rows(self) -> int:
        n = sum(len(ids) for ids, _ in self.emb.values())
        return n + (len(self.bandit.item_ids) if self.bandit is not None else 0)

    @property
    def empty(self) -> bool:
        return (self.n_rows == 0 and not any(len(d) for d in self.deleted.values())
                and self.dense is None and self.centroids is None)


@dataclass(frozen=True)
class Update:
    """One entry of the update stream: what version ``version`` changed after ``prev_version``."""

    stream_id: bytes
    kind: str  # "delta" | "full"
    version: int
    prev_version: int
    generation: str
    updated: float
    dense_version: int
    centroids_version: int
    emb: dict[str, np.ndarray]  # slot -> IDs written (fetch their rows)
    deleted: dict[str, np.ndarray]  # slot -> IDs deleted
    bandit_ids: np.ndarray
    bandit_header: BanditHeader | None
    changelog: str | None  # key holding the ID lists when they were too big to inline

    @classmethod
    def decode(cls, stream_id: bytes, f: Mapping[bytes, bytes]) -> Update:
        try:
            emb, deleted = _id_lists(f)
            return cls(
                stream_id=stream_id, kind=f[b"kind"].decode(), version=int(f[b"v"]),
                prev_version=int(f[b"pv"]), generation=f[b"g"].decode(),
                updated=float(f[b"ts"]), dense_version=int(f[b"dv"]),
                centroids_version=int(f.get(b"cv", b"0")),
                emb=emb, deleted=deleted, bandit_ids=unpack_ids(f.get(b"b")),
                bandit_header=BanditHeader.from_json(f[b"bh"]) if f.get(b"bh") else None,
                changelog=f[b"log"].decode() if f.get(b"log") else None,
            )  # fmt: skip
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
            raise SnapshotFormatError(f"bad update entry {stream_id!r}: {exc!r}") from None

    def with_changelog(self, fields: Mapping[bytes, bytes]) -> Update:
        """This entry with the ID lists read from its changelog key."""
        emb, deleted = _id_lists(fields)
        return Update(self.stream_id, self.kind, self.version, self.prev_version,
                      self.generation, self.updated, self.dense_version,
                      self.centroids_version, emb, deleted, unpack_ids(fields.get(b"b")),
                      self.bandit_header, None)  # fmt: skip


def _id_lists(f: Mapping[bytes, bytes]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    emb, deleted = {}, {}
    for k, v in f.items():
        if k.startswith(b"e:"):
            emb[k[2:].decode()] = unpack_ids(v)
        elif k.startswith(b"d:"):
            deleted[k[2:].decode()] = unpack_ids(v)
    return emb, deleted


@dataclass(frozen=True)
class FullSnapshot:
    """A whole snapshot as read by a replica that starts (or restarts) from Redis alone."""

    meta: SnapshotMeta
    stream_id: bytes  # follow the update stream after this entry
    emb: dict[str, tuple[np.ndarray, np.ndarray]]  # slot -> ids, float32 vectors
    dense: dict[str, np.ndarray]
    bandit: BanditRows | None
    centroids: dict[str, np.ndarray] | None


@dataclass(frozen=True)
class DeltaRows:
    """The rows an :class:`Update` announced, fetched after reading the entry."""

    emb: dict[str, tuple[np.ndarray, np.ndarray]]  # rows still present
    gone: dict[str, np.ndarray]  # announced but already absent: deleted by a later version
    bandit: BanditRows | None
    dense: dict[str, np.ndarray] | None
    centroids: dict[str, np.ndarray] | None


# ---- keys -----------------------------------------------------------------------------------


class Keys:
    """Key names of one model; ``{model}`` is the Redis Cluster hash tag."""

    def __init__(self, model: str) -> None:
        self.prefix = f"fr:{{{model}}}"
        self.meta = f"{self.prefix}:meta"
        self.updates = f"{self.prefix}:updates"
        self.centroids = f"{self.prefix}:centroids"

    def emb(self, generation: str, slot: str, shard: int) -> str:
        return f"{self.prefix}:emb:{generation}:{slot}:{shard}"

    def bandit(self, generation: str, shard: int) -> str:
        return f"{self.prefix}:bandit:{generation}:{shard}"

    def dense(self, version: int) -> str:
        return f"{self.prefix}:dense:{version}"

    def changelog(self, version: int) -> str:
        return f"{self.prefix}:changelog:{version}"

    def generation_keys(self, generation: str, slots: Iterable[str], emb_shards: int,
                        bandit_shards: int) -> list[str]:
        keys = [self.emb(generation, s, i) for s in slots for i in range(emb_shards)]
        return keys + [self.bandit(generation, i) for i in range(bandit_shards)]


def _bandit_row_bytes(rows: BanditRows) -> np.ndarray:
    packed = np.concatenate([rows.t[:, None], rows.d, rows.b], axis=1).astype(_F64)
    return packed


def _decode_bandit(keys: list[bytes], values: list[bytes], n_clusters: int) -> BanditRows:
    ids, packed = _decode_rows(keys, values, 1 + 2 * n_clusters, _F64)
    c = n_clusters
    return BanditRows(ids, packed[:, 0].astype(np.float64), packed[:, 1 : 1 + c].astype(
        np.float64), packed[:, 1 + c :].astype(np.float64))


# ---- the store ------------------------------------------------------------------------------


class SnapshotStore:
    """Synchronous reads and writes of one model's snapshot (the publisher's side).

    ``row_dtype="float16"`` halves Redis memory and network for embeddings at ~1e-3 relative
    error; readers always get float32.
    """

    def __init__(self, client: redis.Redis, model_name: str, *, row_dtype: str = "float32",
                 emb_shards: int = 16, bandit_shards: int = 16) -> None:
        if row_dtype not in ROW_DTYPES:
            raise ValueError(f"row_dtype must be one of {ROW_DTYPES}")
        self.r = client
        self.model = model_name
        self.keys = Keys(model_name)
        self.row_dtype = row_dtype
        self.emb_shards = emb_shards
        self.bandit_shards = bandit_shards

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

    def _row_bytes(self, vectors: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(vectors, dtype=np.dtype(self.row_dtype).newbyteorder("<"))

    def _queue_rows(self, pipe: Any, generation: str, slot: str, ids: np.ndarray,
                    vectors: np.ndarray) -> None:
        if not len(ids):
            return
        shards = shard_of(ids, self.emb_shards)
        rows = self._row_bytes(vectors)
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            keys = _split8(pack_ids(ids[sel]))
            width = rows.shape[1] * rows.itemsize
            vals = rows[sel].tobytes()
            pipe.hset(self.keys.emb(generation, slot, int(s)),
                      mapping=dict(zip(keys, _split_n(vals, width), strict=True)))

    def _queue_deletes(self, pipe: Any, generation: str, slot: str, ids: np.ndarray) -> None:
        if not len(ids):
            return
        shards = shard_of(ids, self.emb_shards)
        for s in np.unique(shards):
            pipe.hdel(self.keys.emb(generation, slot, int(s)),
                      *_split8(pack_ids(ids[shards == s])))

    def _queue_bandit(self, pipe: Any, generation: str, rows: BanditRows) -> None:
        if not len(rows.item_ids):
            return
        shards = shard_of(rows.item_ids, self.bandit_shards)
        packed = _bandit_row_bytes(rows)
        width = packed.shape[1] * 8
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            pipe.hset(self.keys.bandit(generation, int(s)),
                      mapping=dict(zip(_split8(pack_ids(rows.item_ids[sel])),
                                       _split_n(packed[sel].tobytes(), width), strict=True)))

    def write_full(self, data: SnapshotData, *, version: int, prev_version: int,
                   schema_hash: str, slots: Mapping[str, int], created: float | None = None,
                   now: float | None = None) -> str:
        """Write a whole snapshot under a new generation and switch readers to it atomically.

        Rows go out in pipelines of :data:`FULL_PIPELINE_FIELDS` fields (a big table does not
        block Redis in one giant transaction); the switch — meta, stream entry, expiry of the
        previous generation — is one transaction. Returns the new generation.
        """
        if data.dense is None:
            raise ValueError("a full snapshot needs the dense weights")
        now = time.time() if now is None else now
        generation = uuid.uuid4().hex[:12]
        old = self.read_meta()
        # Rows first, in bounded pipelines.
        pipe = self.r.pipeline(transaction=False)
        queued = 0
        for slot, (ids, vectors) in data.emb.items():
            for start in range(0, len(ids), FULL_PIPELINE_FIELDS):
                stop = start + FULL_PIPELINE_FIELDS
                self._queue_rows(pipe, generation, slot, ids[start:stop], vectors[start:stop])
                queued += min(stop, len(ids)) - start
                if queued >= FULL_PIPELINE_FIELDS:
                    pipe.execute()
                    queued = 0
        if data.bandit is not None:
            b = data.bandit
            for start in range(0, len(b.item_ids), FULL_PIPELINE_FIELDS):
                sl = slice(start, start + FULL_PIPELINE_FIELDS)
                self._queue_bandit(pipe, generation, BanditRows(b.item_ids[sl], b.t[sl],
                                                                b.d[sl], b.b[sl]))
                pipe.execute()
        self._queue_blob(pipe, self.keys.dense(version), data.dense)
        if data.centroids is not None:
            self._queue_blob(pipe, self.keys.centroids, data.centroids)
        pipe.execute()
        # Then the atomic switch.
        tx = self.r.pipeline(transaction=True)
        meta = {
            "version": version, "dense_version": version,
            "centroids_version": version if data.centroids is not None else 0,
            "schema_hash": schema_hash,
            "created": created if created is not None else (old.created if old else now),
            "updated": now, "generation": generation, "row_dtype": self.row_dtype,
            "emb_shards": self.emb_shards, "bandit_shards": self.bandit_shards,
            "slots": json.dumps(dict(slots)),
            "bandit": data.bandit_header.to_json() if data.bandit_header else "",
        }  # fmt: skip
        tx.delete(self.keys.meta)
        tx.hset(self.keys.meta, mapping=meta)
        entry = {"kind": "full", "v": version, "pv": prev_version, "g": generation, "ts": now,
                 "dv": version, "cv": meta["centroids_version"]}
        if data.bandit_header:
            entry["bh"] = data.bandit_header.to_json()
        tx.xadd(self.keys.updates, entry, maxlen=STREAM_MAXLEN, approximate=True)
        if old is not None and old.generation != generation:
            for k in self.keys.generation_keys(old.generation, old.slots, old.emb_shards,
                                               old.bandit_shards):
                tx.expire(k, OLD_GENERATION_TTL_S)
            if old.dense_version != version:
                tx.expire(self.keys.dense(old.dense_version), OLD_DENSE_TTL_S)
        tx.execute()
        return generation

    def write_delta(self, data: SnapshotData, *, generation: str, version: int,
                    prev_version: int, dense_version: int, centroids_version: int,
                    prev_dense_version: int, now: float | None = None) -> None:
        """One transaction: rows, deletions, bandit rows, dense/centroids if given, meta, entry.

        ``dense_version`` is the dense version current after this publish (== ``version`` when
        ``data.dense`` is set); the superseded dense key gets an expiry.
        """
        now = time.time() if now is None else now
        tx = self.r.pipeline(transaction=True)
        for slot, (ids, vectors) in data.emb.items():
            self._queue_rows(tx, generation, slot, ids, vectors)
        for slot, ids in data.deleted.items():
            self._queue_deletes(tx, generation, slot, ids)
        if data.bandit is not None:
            self._queue_bandit(tx, generation, data.bandit)
        if data.dense is not None:
            self._queue_blob(tx, self.keys.dense(dense_version), data.dense)
            if prev_dense_version != dense_version:
                tx.expire(self.keys.dense(prev_dense_version), OLD_DENSE_TTL_S)
        if data.centroids is not None:
            self._queue_blob(tx, self.keys.centroids, data.centroids)
        meta: dict[str, Any] = {"version": version, "updated": now,
                                "dense_version": dense_version,
                                "centroids_version": centroids_version}
        if data.bandit_header is not None:
            meta["bandit"] = data.bandit_header.to_json()
        tx.hset(self.keys.meta, mapping=meta)
        lists: dict[bytes, bytes] = {}
        for slot, (ids, _) in data.emb.items():
            if len(ids):
                lists[f"e:{slot}".encode()] = pack_ids(ids)
        for slot, ids in data.deleted.items():
            if len(ids):
                lists[f"d:{slot}".encode()] = pack_ids(ids)
        if data.bandit is not None and len(data.bandit.item_ids):
            lists[b"b"] = pack_ids(data.bandit.item_ids)
        entry: dict[Any, Any] = {"kind": "delta", "v": version, "pv": prev_version,
                                 "g": generation, "ts": now, "dv": dense_version,
                                 "cv": centroids_version}
        if data.bandit_header is not None:
            entry["bh"] = data.bandit_header.to_json()
        if sum(len(v) for v in lists.values()) > 8 * INLINE_ID_LIMIT:
            log_key = self.keys.changelog(version)
            tx.hset(log_key, mapping=lists)
            tx.expire(log_key, CHANGELOG_TTL_S)
            entry["log"] = log_key
        else:
            entry.update(lists)
        tx.xadd(self.keys.updates, entry, maxlen=STREAM_MAXLEN, approximate=True)
        tx.execute()

    def _queue_blob(self, pipe: Any, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        pipe.delete(key)
        pipe.hset(key, mapping=encode_arrays(arrays))

    def drop(self) -> None:
        """Delete every key of this model (tests, decommissioning)."""
        for k in self.r.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
            self.r.delete(k)


def _split_n(raw: bytes, width: int) -> list[bytes]:
    return [raw[i : i + width] for i in range(0, len(raw), width)]


# ---- read plans shared by the sync and async readers ----------------------------------------


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
        ids, rows = _decode_rows(keys, values, dim, dtype)
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
        bandit = _decode_bandit(keys, values, meta.bandit.n_clusters)
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
        gone: dict[str, list[np.ndarray]] = {}
        bk: list[bytes] = []
        bv: list[bytes] = []
        for slot, ids in self.groups:
            values = next(it)
            present = [v is not None for v in values]
            keys = _split8(pack_ids(ids))
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
            ids, rows = _decode_rows(ks, emb_v[slot], self.meta.slots[slot], dtype)
            emb[slot] = (ids, rows.astype(np.float32))
        bandit = None
        if bk and self.update.bandit_header is not None:
            bandit = _decode_bandit(bk, bv, self.update.bandit_header.n_clusters)
        dense = centroids = None
        if self.want_dense:
            fields = next(it)
            if not fields:
                raise SnapshotFormatError(f"dense version {self.update.dense_version} missing")
            dense = decode_arrays(fields)
        if self.want_centroids:
            fields = next(it)
            centroids = decode_arrays(fields) if fields else None
        return DeltaRows(emb, {k: np.concatenate(v) for k, v in gone.items()}, bandit, dense,
                         centroids)


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
                                   _split8(pack_ids(sel)))))
            groups.append((slot, sel))
    if len(update.bandit_ids):
        shards = shard_of(update.bandit_ids, meta.bandit_shards)
        for s in np.unique(shards):
            sel = update.bandit_ids[shards == s]
            cmds.append(("hmget", (keys.bandit(update.generation, int(s)),
                                   _split8(pack_ids(sel)))))
            groups.append(("", sel))
    want_dense = update.dense_version != current_dense
    if want_dense:
        cmds.append(("hgetall", (keys.dense(update.dense_version),)))
    want_centroids = update.centroids_version != current_centroids
    if want_centroids:
        cmds.append(("hgetall", (keys.centroids,)))
    return _DeltaPlan(cmds, meta, update, groups, want_dense, want_centroids)


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


__all__ = [
    "AsyncSnapshotReader", "BanditHeader", "BanditRows", "DeltaRows", "FullSnapshot", "Keys",
    "SnapshotData", "SnapshotFormatError", "SnapshotMeta", "SnapshotStore", "Update",
    "decode_arrays", "encode_arrays",
]  # fmt: skip
