"""The wire codec of the snapshot layout: bytes in Redis <-> numpy arrays, nothing else.

Nothing read from Redis is trusted code: arrays are ``np.frombuffer`` with explicit dtypes and
validated lengths, metadata is JSON; no pickle anywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

CHUNK_BYTES = 1 << 20  # large values are split so no single Redis value exceeds ~1 MB
# Image chunks are bigger: a 1 M-row image is tens of MB, and every chunk is one reply to read.
IMAGE_CHUNK_BYTES = 4 << 20
ROW_DTYPES = ("float32", "float16")
ID_DTYPE = np.dtype("<i8")
F64 = np.dtype("<f8")


class SnapshotFormatError(ValueError):
    """Something in Redis does not have the shape the layout promises (corrupt or foreign)."""


def pack_ids(ids: np.ndarray) -> bytes:
    """int64 IDs as one little-endian byte string (8 bytes each)."""
    return np.ascontiguousarray(ids, dtype=ID_DTYPE).tobytes()


def unpack_ids(raw: bytes | None) -> np.ndarray:
    """Inverse of :func:`pack_ids`, refusing lengths that are not a multiple of 8."""
    if not raw:
        return np.empty(0, dtype=np.int64)
    if len(raw) % 8:
        raise SnapshotFormatError(f"ID list of {len(raw)} bytes is not a multiple of 8")
    return np.frombuffer(raw, dtype=ID_DTYPE).astype(np.int64)


def split_fixed(raw: bytes, width: int) -> list[bytes]:
    """``raw`` cut into ``width``-byte pieces (hash fields and values are one per ID)."""
    return [raw[i : i + width] for i in range(0, len(raw), width)]


def id_fields(ids: np.ndarray) -> list[bytes]:
    """One 8-byte hash field per ID (the row hashes are keyed by packed IDs)."""
    return split_fixed(pack_ids(ids), 8)


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


def _record_dtype(width: int, dtype: np.dtype) -> np.dtype:
    return np.dtype([("id", ID_DTYPE), ("row", dtype.newbyteorder("<"), (width,))])


def encode_records(ids: np.ndarray, rows: np.ndarray, dtype: np.dtype,
                   chunk_bytes: int = IMAGE_CHUNK_BYTES) -> list[bytes]:
    """(IDs, rows) -> ``8-byte ID | row`` records in ID order, cut at record boundaries into
    chunks of at most ``chunk_bytes`` (the inverse of :func:`decode_records`, whose readers
    then skip their sort)."""
    rows = np.asarray(rows)
    width = rows.shape[1] if rows.ndim == 2 else 0
    rec = _record_dtype(width, dtype)
    order = np.argsort(ids)
    records = np.empty(len(ids), dtype=rec)
    records["id"] = ids[order]
    records["row"] = rows[order]
    per_chunk = max(1, chunk_bytes // rec.itemsize)
    return [records[i : i + per_chunk].tobytes() for i in range(0, len(records), per_chunk)]


def last_per_id(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique IDs and, for each, its last vector in ``ids`` order (last write wins)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():
        return ids, vectors
    # Unsorted: one plain sort serves the usual case, a full snapshot's unique IDs. Only with
    # duplicates does the order among equal IDs matter, which the stable path below keeps
    # (np.unique with return_index costs ~4x a sort on 1 M IDs and holds the GIL longer).
    order = ids.argsort()
    ordered = ids[order]
    if not (ordered[1:] == ordered[:-1]).any():
        return ordered, vectors[order]
    rev = ids[::-1]
    uniq, first_in_rev = np.unique(rev, return_index=True)
    return uniq, vectors[len(ids) - 1 - first_in_rev]


def decode_records(blobs: list[bytes], width: int, dtype: np.dtype
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``8-byte ID | row`` records -> (sorted unique int64 IDs, rows ``(n, width)``).

    Lengths are checked; an ID seen twice (HSCAN may return a field twice while Redis
    rehashes) keeps one copy — the copies are equal. Records already in ID order (an image)
    skip the sort.
    """
    rec = _record_dtype(width, dtype)
    parts = []
    for b in blobs:
        if len(b) % rec.itemsize:
            raise SnapshotFormatError(f"{len(b)} bytes are not whole {rec.itemsize}-byte rows")
        parts.append(np.frombuffer(b, dtype=rec))
    if not parts:
        return np.empty(0, np.int64), np.empty((0, width), dtype.newbyteorder("<"))
    ids = np.concatenate([p["id"] for p in parts]).astype(np.int64, copy=False)
    rows = np.concatenate([p["row"] for p in parts])
    return last_per_id(ids, rows)


def decode_found_rows(ids: np.ndarray, found_flags: bytes, values: bytes, width: int,
                      dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows asked for by ID -> (present IDs, their rows, absent IDs), lengths checked.

    ``found_flags`` holds one ASCII ``1``/``0`` per ID; ``values`` the present rows in order.
    """
    found = np.frombuffer(found_flags, dtype=np.uint8) == ord("1")
    if len(found) != len(ids) or len(values) != width * dtype.itemsize * int(found.sum()):
        raise SnapshotFormatError("rows of the wrong size")
    rows = np.frombuffer(values, dtype=dtype.newbyteorder("<")).reshape(-1, width)
    return ids[found], rows, ids[~found]


__all__ = [
    "CHUNK_BYTES", "F64", "ID_DTYPE", "IMAGE_CHUNK_BYTES", "ROW_DTYPES", "SnapshotFormatError",
    "decode_arrays", "decode_found_rows", "decode_records", "encode_arrays", "encode_records",
    "id_fields", "last_per_id", "pack_ids", "split_fixed", "unpack_ids",
]  # fmt: skip
