"""Writing a snapshot: full snapshots under a new generation, and one-transaction deltas.

The trainer's publisher writes through :class:`SnapshotStore`; it also reads (meta, the current
generation) through the :class:`~featurestore.snapshot_reader.SnapshotReader` it extends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import redis

from featurestore.snapshot_codec import (
    F64,
    ROW_DTYPES,
    encode_arrays,
    encode_records,
    id_fields,
    pack_ids,
    split_fixed,
)
from featurestore.snapshot_keys import shard_of
from featurestore.snapshot_reader import SnapshotReader
from featurestore.snapshot_types import (
    BanditRows,
    ImageRef,
    SnapshotData,
    bandit_row_bytes,
)

FULL_PIPELINE_FIELDS = 10_000  # fields per pipeline while writing a full snapshot
INLINE_ID_LIMIT = 4_096  # deltas announcing more IDs move their ID lists to a changelog key
STREAM_MAXLEN = 10_000  # ~33 min of history at 5 publishes/s for lagging replicas
OLD_GENERATION_TTL_S = 120
OLD_DENSE_TTL_S = 300
CHANGELOG_TTL_S = 600
OLD_IMAGE_TTL_S = 120  # a replica mid-way through reading a superseded image finishes it
UNFINISHED_IMAGE_TTL_S = 600


class SnapshotStore(SnapshotReader):
    """Synchronous reads and writes of one model's snapshot (the publisher's side).

    ``row_dtype="float16"`` halves Redis memory and network for embeddings at ~1e-3 relative
    error; readers always get float32.
    """

    def __init__(self, client: redis.Redis, model_name: str, *, row_dtype: str = "float32",
                 emb_shards: int = 16, bandit_shards: int = 16,
                 bucket: int | None = None, writer: str = "") -> None:
        if row_dtype not in ROW_DTYPES:
            raise ValueError(f"row_dtype must be one of {ROW_DTYPES}")
        super().__init__(client, model_name, bucket=bucket)
        self.row_dtype = row_dtype
        self.emb_shards = emb_shards
        self.bandit_shards = bandit_shards
        # Who writes this chain (``rank-<r>`` for trainer ranks), stamped on its meta and on
        # every stream entry: a chain must have one writer, and this shows which one it had.
        self.writer = writer
        # (version, stream id, generation) of the last entry this writer added: what an image
        # written now is labelled with (a single writer per chain, so nothing came after it).
        self.last_entry: tuple[int, bytes, str] | None = None
        self.image: ImageRef | None = None

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
            keys = id_fields(ids[sel])
            width = rows.shape[1] * rows.itemsize
            vals = rows[sel].tobytes()
            pipe.hset(self.keys.emb(generation, slot, int(s)),
                      mapping=dict(zip(keys, split_fixed(vals, width), strict=True)))

    def _queue_deletes(self, pipe: Any, generation: str, slot: str, ids: np.ndarray) -> None:
        if not len(ids):
            return
        shards = shard_of(ids, self.emb_shards)
        for s in np.unique(shards):
            pipe.hdel(self.keys.emb(generation, slot, int(s)),
                      *id_fields(ids[shards == s]))

    def _queue_bandit(self, pipe: Any, generation: str, rows: BanditRows) -> None:
        if not len(rows.item_ids):
            return
        shards = shard_of(rows.item_ids, self.bandit_shards)
        packed = bandit_row_bytes(rows)
        width = packed.shape[1] * 8
        for s in np.unique(shards):
            sel = np.flatnonzero(shards == s)
            pipe.hset(self.keys.bandit(generation, int(s)),
                      mapping=dict(zip(id_fields(rows.item_ids[sel]),
                                       split_fixed(packed[sel].tobytes(), width), strict=True)))

    def write_full(self, data: SnapshotData, *, version: int, prev_version: int,
                   schema_hash: str, slots: Mapping[str, int], created: float | None = None,
                   now: float | None = None) -> str:
        """Write a whole snapshot under a new generation and switch readers to it atomically.

        Rows go out in pipelines of :data:`FULL_PIPELINE_FIELDS` fields (a big table does not
        block Redis in one giant transaction); the switch — meta, stream entry, expiry of the
        previous generation — is one transaction. Returns the new generation.
        """
        if data.dense is None and self.bucket is None:
            raise ValueError("a full snapshot needs the dense weights")
        dense_version = version if data.dense is not None else 0  # 0: a bucket chain
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
        if data.dense is not None:
            self._queue_blob(pipe, self.keys.dense(version), data.dense)
        if data.centroids is not None:
            self._queue_blob(pipe, self.keys.centroids, data.centroids)
        pipe.execute()
        # Then the atomic switch.
        tx = self.r.pipeline(transaction=True)
        meta = {
            "version": version, "dense_version": dense_version,
            "centroids_version": version if data.centroids is not None else 0,
            "schema_hash": schema_hash,
            "created": created if created is not None else (old.created if old else now),
            "updated": now, "generation": generation, "row_dtype": self.row_dtype,
            "emb_shards": self.emb_shards, "bandit_shards": self.bandit_shards,
            "slots": json.dumps(dict(slots)),
            "bandit": data.bandit_header.to_json() if data.bandit_header else "",
            "writer": self.writer,
        }  # fmt: skip
        tx.delete(self.keys.meta)
        tx.hset(self.keys.meta, mapping=meta)
        entry = {"kind": "full", "v": version, "pv": prev_version, "g": generation, "ts": now,
                 "dv": dense_version, "cv": meta["centroids_version"], "w": self.writer}
        if data.bandit_header:
            entry["bh"] = data.bandit_header.to_json()
        tx.xadd(self.keys.updates, entry, maxlen=STREAM_MAXLEN, approximate=True)
        if old is not None and old.generation != generation:
            for k in self.keys.generation_keys(old.generation, old.slots, old.emb_shards,
                                               old.bandit_shards):
                tx.expire(k, OLD_GENERATION_TTL_S)
            if old.dense_version not in (0, dense_version):
                tx.expire(self.keys.dense(old.dense_version), OLD_DENSE_TTL_S)
            if old.image is not None:
                tx.expire(self.keys.image(old.generation, old.image.version), OLD_IMAGE_TTL_S)
        self._entry_added(version, tx.execute(), generation)
        self.image = None
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
                                 "cv": centroids_version, "w": self.writer}
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
        self._entry_added(version, tx.execute(), generation)

    def _entry_added(self, version: int, results: list[Any], generation: str) -> None:
        stream_id = results[-1]
        self.last_entry = (version, stream_id if isinstance(stream_id, bytes)
                           else str(stream_id).encode(), generation)

    def write_image(self, data: SnapshotData) -> bool:
        """Write every row of ``data`` as one image of the last version this writer published.

        ``data`` must be the chain's whole state as of that version (the publisher gathers it
        right after the delta it last wrote). A full read then costs Redis a few big string
        replies instead of a walk over every hash field: about a tenth of its CPU for a 1 M-row
        table (docs/serving.md). Rows go out in several commands; ``meta.image`` points at the
        image only once all of it is written, and the image it replaces expires. False when
        there is nothing new to image.
        """
        if self.last_entry is None:
            return False
        version, stream_id, generation = self.last_entry
        if self.image is not None and self.image.version == version:
            return False
        key = self.keys.image(generation, version)
        dtype = np.dtype(self.row_dtype).newbyteorder("<")
        fields: dict[str, bytes] = {}
        chunks: dict[str, int] = {}
        for slot, (ids, vectors) in data.emb.items():
            parts = encode_records(ids, self._row_bytes(vectors), dtype) if len(ids) else []
            chunks[slot] = len(parts)
            fields.update({f"e:{slot}:{i}": p for i, p in enumerate(parts)})
        bandit_chunks = 0
        if data.bandit is not None and len(data.bandit.item_ids):
            parts = encode_records(data.bandit.item_ids, bandit_row_bytes(data.bandit), F64)
            bandit_chunks = len(parts)
            fields.update({f"b:{i}": p for i, p in enumerate(parts)})
        # Until meta points at it the image expires on its own: a write cut short (Redis
        # away mid-way) leaves nothing behind for good.
        self.r.delete(key)
        for name, part in fields.items():  # one chunk per command: no burst of many MB at once
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(key, name, part)
            pipe.expire(key, UNFINISHED_IMAGE_TTL_S)
            pipe.execute()
        manifest = {"version": version, "emb": chunks, "bandit": bandit_chunks}
        ref = ImageRef(version, stream_id)
        tx = self.r.pipeline(transaction=True)
        tx.hset(key, "manifest", json.dumps(manifest))
        tx.persist(key)
        tx.hset(self.keys.meta, "image", ref.to_json())
        if self.image is not None:
            tx.expire(self.keys.image(generation, self.image.version), OLD_IMAGE_TTL_S)
        tx.execute()
        self.image = ref
        return True

    def announce_reload(self, now: float | None = None) -> int:
        """Make every replica reload the current snapshot in full; the new version.

        Bumps the version and announces it as a full snapshot of the same generation, which
        writes no rows. For operators (a replica suspected of diverging) and the reload
        benchmark. Refused when there is no snapshot.
        """
        meta = self.read_meta()
        if meta is None:
            raise ValueError("no snapshot to reload")
        now = time.time() if now is None else now
        version = meta.version + 1
        tx = self.r.pipeline(transaction=True)
        tx.hset(self.keys.meta, mapping={"version": version, "updated": now})
        entry: dict[Any, Any] = {"kind": "full", "v": version, "pv": meta.version,
                                 "g": meta.generation, "ts": now, "dv": meta.dense_version,
                                 "cv": meta.centroids_version}
        if meta.bandit is not None:
            entry["bh"] = meta.bandit.to_json()
        tx.xadd(self.keys.updates, entry, maxlen=STREAM_MAXLEN, approximate=True)
        tx.execute()
        return version

    def _queue_blob(self, pipe: Any, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        pipe.delete(key)
        pipe.hset(key, mapping=encode_arrays(arrays))

    def drop(self) -> None:
        """Delete every key of this model (tests, decommissioning)."""
        for k in self.r.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
            self.r.delete(k)


__all__ = ["INLINE_ID_LIMIT", "SnapshotStore"]
