"""Raw values -> 64-bit feature IDs -> one jagged batch type shared by table, model and service.

ID encoding: integers are their own ID; strings go through xxh64 (collision odds among n IDs are
about n^2/2^65, ~1e-4 at 100 M IDs), so no two raw values share a row by construction of the
table. Bucketized numbers become their bucket index. IDs live per slot (one table per slot), so
the same raw value in two slots never meets.

:class:`SparseBatch` is the ``KeyedJaggedTensor`` of this project: per slot a flat ``ids`` array
and ``offsets`` (length ``size + 1``); a missing value is an empty bag that pools to zeros.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from featurestore.schema import ModelConfig, SlotConfig, SlotKind, SlotSide

_MASK63 = (1 << 63) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63) + 1, (1 << 63) - 1  # int64 min is the table's sentinel
_hash = xxhash.xxh64_intdigest


def encode_value(value: Any) -> int:
    """The int64 feature ID of one raw categorical value."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return value
    # Keep hashed IDs non-negative: negative IDs stay free as sentinels for the table.
    return _hash(str(value).encode()) & _MASK63


@dataclass(frozen=True, slots=True)
class SlotIds:
    """The IDs of one slot for a batch: ``ids[offsets[i]:offsets[i+1]]`` belong to example i."""

    ids: np.ndarray  # int64
    offsets: np.ndarray  # int64, length size + 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


@dataclass(frozen=True, slots=True)
class SparseBatch:
    """Jagged IDs for every slot of one side (or both) of a batch of examples."""

    size: int
    slots: dict[str, SlotIds]


class Featurizer:
    """Turns records (``user_id``, ``item_id`` and feature values in one mapping) into IDs."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._encoders = {s.name: self._encoder_for(s) for s in config.slots}

    @staticmethod
    def _encoder_for(slot: SlotConfig):
        if slot.kind is SlotKind.BUCKETIZED:
            bounds = list(slot.boundaries)

            def bucket(value: Any) -> list[int]:
                try:
                    return [bisect_right(bounds, float(value))]
                except (TypeError, ValueError):
                    return []

            return bucket
        if slot.kind is SlotKind.MULTI_VALUED:

            def many(value: Any) -> list[int]:
                if isinstance(value, list):
                    return [encode_value(v) for v in value]
                return [encode_value(v) for v in str(value).split("|") if v]

            return many

        def one(value: Any) -> list[int]:
            return [encode_value(value)]

        return one

    def featurize(
        self, records: Sequence[Mapping[str, Any]], side: SlotSide | None = None
    ) -> SparseBatch:
        """IDs for every slot (or only those of ``side``) of ``records``."""
        slots = [s for s in self.config.slots if side is None or s.side is side]
        out: dict[str, SlotIds] = {}
        n = len(records)
        for slot in slots:
            encode = self._encoders[slot.name]
            source = slot.source
            ids: list[int] = []
            offsets = np.empty(n + 1, dtype=np.int64)
            offsets[0] = 0
            for i, rec in enumerate(records):
                value = rec.get(source)
                if value is not None:
                    ids.extend(encode(value))
                offsets[i + 1] = len(ids)
            out[slot.name] = SlotIds(np.array(ids, dtype=np.int64), offsets)
        return SparseBatch(n, out)


def event_record(user_id: str, item_id: str, features: Mapping[str, Any]) -> dict[str, Any]:
    """The flat mapping a featurizer reads: ids beside the feature values."""
    rec = dict(features)
    rec["user_id"] = user_id
    rec["item_id"] = item_id
    return rec


def concat_ids(batches: Iterable[SlotIds]) -> SlotIds:
    """Concatenate jagged IDs of consecutive sub-batches into one."""
    batches = list(batches)
    ids = np.concatenate([b.ids for b in batches])
    lens = np.concatenate([b.lengths for b in batches])
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return SlotIds(ids, offsets)
