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
from itertools import chain
from operator import attrgetter, itemgetter, methodcaller
from typing import Any

import numpy as np
import xxhash

from featurestore.schema import ModelConfig, SlotConfig, SlotKind, SlotSide

_MASK63 = (1 << 63) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63) + 1, (1 << 63) - 1  # int64 min is the table's sentinel
_hash = xxhash.xxh64_intdigest
_FEATURES = attrgetter("features")


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


class _SlotEncoder:
    """Raw values of one slot -> jagged IDs, memoizing value -> IDs.

    On real streams values repeat (IDs, demographics, genres), so most of a batch is a dict
    hit instead of type dispatch plus xxh64. Equal Python values (``1``, ``1.0``, ``True``)
    encode to the same ID, so they may share a memo entry; lists are memoized as tuples. The
    memo is cleared when it exceeds ``max_entries``, bounding memory on one-off IDs.
    """

    def __init__(self, slot: SlotConfig, max_entries: int) -> None:
        self.slot = slot
        self.max_entries = max_entries
        self._memo: dict[Any, tuple[int, ...]] = {}
        self._single_memo: dict[Any, int] = {}  # values of exactly one ID, unboxed
        if slot.kind is SlotKind.BUCKETIZED:
            bounds = list(slot.boundaries)

            def encode(value: Any) -> tuple[int, ...]:
                try:
                    return (bisect_right(bounds, float(value)),)
                except (TypeError, ValueError):
                    return ()
        elif slot.kind is SlotKind.MULTI_VALUED:

            def encode(value: Any) -> tuple[int, ...]:
                if isinstance(value, list | tuple):
                    return tuple(encode_value(v) for v in value)
                return tuple(encode_value(v) for v in str(value).split("|") if v)
        else:

            def encode(value: Any) -> tuple[int, ...]:
                return (encode_value(value),)

        self._encode = encode
        self._single = slot.kind is not SlotKind.MULTI_VALUED

    def _ids_of(self, value: Any) -> tuple[int, ...]:
        if value is None:
            return ()
        key = tuple(value) if isinstance(value, list) else value
        memo = self._memo
        try:
            ids = memo.get(key)
        except TypeError:  # unhashable inside (a list in a list): encode, do not memoize
            return self._encode(value)
        if ids is None:
            if len(memo) >= self.max_entries:
                memo.clear()
                self._single_memo.clear()
            ids = memo[key] = self._encode(value)
            if len(ids) == 1 and not isinstance(value, list):
                self._single_memo[key] = ids[0]
        return ids

    def memoized(self, values: Iterable[Any], n: int) -> SlotIds | None:
        """The IDs of ``n`` values if every one is present and memoized to one ID, else None.

        One C-level pass with no list of values in between: the common case of a
        single-valued slot on a stream whose values repeat. A miss, an absent value (the
        getter raises ``KeyError``) or an unhashable one (``TypeError``) returns ``None``, and
        the caller falls back to :meth:`encode` on the column.
        """
        if not self._single:
            return None
        try:
            ids = np.fromiter(map(self._single_memo.get, values), dtype=np.int64, count=n)
        except (TypeError, KeyError):
            return None
        return SlotIds(ids, np.arange(n + 1, dtype=np.int64))

    def encode(self, values: Sequence[Any]) -> SlotIds:
        """The jagged IDs of a column of raw values (``None``: no value, an empty bag)."""
        n = len(values)
        if self._single:
            # The common case in one C-level pass: every value present and memoized to one ID
            # (a miss is a None, which fromiter refuses). On a miss, the column's distinct new
            # values are memoized once each and the pass repeats: a time-ordered stream
            # brings a new user with dozens of events in one batch, and the batch pays for
            # that user once, not once per event.
            single = self._single_memo
            for attempt in range(2):
                try:
                    ids = np.fromiter(map(single.get, values), dtype=np.int64, count=n)
                    return SlotIds(ids, np.arange(n + 1, dtype=np.int64))
                except TypeError:
                    if attempt or not self._memoize_new(values, single):
                        break
        bags = self._bags(values)
        lengths = list(map(len, bags))
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(chain.from_iterable(bags), dtype=np.int64, count=int(offsets[-1]))
        return SlotIds(ids, offsets)

    def _memoize_new(self, keys: Iterable[Any], memo: Mapping[Any, Any]) -> bool:
        """Memoize each distinct key not in ``memo`` yet; False if some key is unhashable."""
        try:
            new = set(keys).difference(memo)
        except TypeError:
            return False
        for key in new:
            self._ids_of(key)
        return True

    def _bags(self, values: Sequence[Any]) -> list[tuple[int, ...]]:
        """Each value's IDs: memo hits in C-level passes, the distinct misses once each.

        Keys are the values, lists as tuples (as :meth:`_ids_of` keys them); a column mixing
        lists with other types, or holding unhashable values, goes value by value.
        """
        kinds = set(map(type, values))
        if list in kinds:
            if len(kinds) > 1:
                return list(map(self._ids_of, values))
            keys: Sequence[Any] = list(map(tuple, values))
        else:
            keys = values
        try:
            bags = list(map(self._memo.get, keys))
        except TypeError:  # unhashable inside (a list in a list)
            return list(map(self._ids_of, values))
        if None in bags and self._memoize_new(keys, self._memo):
            bags = list(map(self._memo.get, keys))
        i = -1
        try:
            while True:  # left only if the memo was cleared meanwhile: one by one
                i = bags.index(None, i + 1)
                bags[i] = self._ids_of(values[i])
        except ValueError:  # no miss left
            pass
        return bags


class Featurizer:
    """Turns examples into jagged IDs per slot: from records (one mapping per example holding
    ``user_id``, ``item_id`` and the feature values) or straight from parsed events.

    ``max_entries`` bounds each slot's memo of value -> IDs (see :class:`_SlotEncoder`).
    """

    def __init__(self, config: ModelConfig, max_entries: int = 1 << 20) -> None:
        self.config = config
        self._encoders = {s.name: _SlotEncoder(s, max_entries) for s in config.slots}

    def _slots(self, side: SlotSide | None) -> list[SlotConfig]:
        return [s for s in self.config.slots if side is None or s.side is side]

    def featurize(
        self, records: Sequence[Mapping[str, Any]], side: SlotSide | None = None
    ) -> SparseBatch:
        """IDs for every slot (or only those of ``side``) of ``records``."""
        out = {s.name: self._encoders[s.name].encode([r.get(s.source) for r in records])
               for s in self._slots(side)}
        return SparseBatch(len(records), out)

    def featurize_events(self, events: Sequence[Any], side: SlotSide | None = None
                         ) -> SparseBatch:
        """IDs straight from parsed events (anything with ``user_id``, ``item_id`` and a
        ``features`` dict), without building a record per event.

        A single-valued slot whose every value is present and memoized is read in one chained
        C-level pass (event -> value -> ID), with no column in between; any other slot gets
        its column of values (``None`` where absent) and goes through :meth:`_SlotEncoder.encode`.
        """
        features = list(map(_FEATURES, events))
        out = {}
        for s in self._slots(side):
            src = s.source
            encoder = self._encoders[s.name]
            from_event = src in ("user_id", "item_id")
            getter = attrgetter(src) if from_event else itemgetter(src)
            ids = encoder.memoized(map(getter, events if from_event else features),
                                   len(events))
            if ids is None:
                ids = encoder.encode(list(map(getter, events)) if from_event
                                     else _column(features, src))
            out[s.name] = ids
        return SparseBatch(len(events), out)


def _column(features: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    """Feature ``name`` of every event (``None`` where absent)."""
    try:
        return list(map(itemgetter(name), features))
    except KeyError:
        return list(map(methodcaller("get", name), features))


def bandit_keys(item_ids: Sequence[Any]) -> np.ndarray:
    """The exploration statistics' key of each item: its ID encoded as a categorical value.

    The trainer updates and the service scores the statistics under these keys; for a
    categorical item slot they equal the slot's IDs, which the service reuses when it has them.
    """
    return np.fromiter(map(encode_value, item_ids), dtype=np.int64, count=len(item_ids))


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
