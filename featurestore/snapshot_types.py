"""What a snapshot is made of: the records stored in Redis and read back, and their decoding.

Update protocol: every publish is one transaction that writes the rows first and then XADDs
the entry announcing them (an :class:`Update`), with ``version`` and ``prev_version``. Versions
only go up; a reader applies entries whose ``prev_version`` equals its own version and reloads
fully when they do not chain (stream trimmed past it, a publisher restart, a new generation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from featurestore.snapshot_codec import (
    F64,
    ROW_DTYPES,
    SnapshotFormatError,
    unpack_ids,
)


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


_STREAM_ID = re.compile(rb"\d{1,20}-\d{1,20}")


@dataclass(frozen=True)
class ImageRef:
    """Where the newest image of a chain's rows is: the version it holds and that version's
    stream entry (a full read loads it, then the rows the entries after it announced)."""

    version: int
    stream_id: bytes

    def to_json(self) -> str:
        return json.dumps({"v": self.version, "id": self.stream_id.decode()})

    @classmethod
    def from_json(cls, raw: str) -> ImageRef:
        d = json.loads(raw)
        version, stream_id = int(d["v"]), str(d["id"]).encode()
        if version < 1 or not _STREAM_ID.fullmatch(stream_id):
            raise ValueError(f"image reference {raw[:80]!r}")
        return cls(version, stream_id)


def _image_ref(raw: str | None) -> ImageRef | None:
    """The meta's image reference; None when absent or unusable (an image is only a shortcut:
    a damaged reference makes full reads walk the hashes, it does not make the meta unusable)."""
    if not raw:
        return None
    try:
        return ImageRef.from_json(raw)
    except (ValueError, TypeError, KeyError):
        return None


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
    image: ImageRef | None = None

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
                image=_image_ref(g.get("image")),
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
    source: str = "scan"  # "image": an image plus the rows changed since; "scan": every row


@dataclass(frozen=True)
class DeltaRows:
    """What applying an :class:`Update` means, fetched after reading the entry.

    ``deleted`` is complete: the IDs the update deleted (from the stream entry or, for a big
    delta, from its changelog key) plus the announced rows already absent (deleted by a later
    version). Appliers read deletions from here only: the stream entry of a big delta carries
    no ID lists at all.
    """

    emb: dict[str, tuple[np.ndarray, np.ndarray]]  # rows still present
    deleted: dict[str, np.ndarray]
    bandit: BanditRows | None
    dense: dict[str, np.ndarray] | None
    centroids: dict[str, np.ndarray] | None



def bandit_row_bytes(rows: BanditRows) -> np.ndarray:
    """float64 ``(n, 1 + 2C)`` rows ``[t, d..., b...]``: the bandit hash's value layout."""
    return np.concatenate([rows.t[:, None], rows.d, rows.b], axis=1).astype(F64)


def bandit_rows(ids: np.ndarray, packed: np.ndarray, n_clusters: int) -> BanditRows:
    """Rows in the bandit hash's value layout (see :func:`bandit_row_bytes`) -> BanditRows."""
    c = n_clusters
    packed = np.asarray(packed, dtype=np.float64)
    return BanditRows(ids, packed[:, 0].copy(), packed[:, 1 : 1 + c].copy(),
                      packed[:, 1 + c :].copy())


__all__ = [
    "BanditHeader", "BanditRows", "DeltaRows", "FullSnapshot", "ImageRef", "SnapshotData",
    "SnapshotMeta",
    "Update", "bandit_row_bytes", "bandit_rows",
]  # fmt: skip
