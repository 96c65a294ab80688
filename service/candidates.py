"""Item-side IDs of every candidate a replica has seen, gathered per request with numpy.

Featurizing 100 candidates (hashing every feature value in Python) was the largest cost of a
request, and candidate items repeat across requests, so their IDs are computed once and kept.
A per-item cache of Python tuples still cost ~0.15 ms per request to flatten (a chain over
every item's tuple, a length list, a cumsum over a list). Here every distinct candidate gets a
row in compact per-slot arrays (start, length, and the slot's flat IDs), so one request costs
one dict lookup per candidate plus a few fancy-indexing calls per slot, whatever its size.

Keys are exact bytes, so two candidates share IDs only when they are the same JSON value:
``1`` and ``1.0`` or ``true`` never alias. A request body's candidate is keyed by its JSON
object exactly as received; the body parser (``service.schemas``) validates a candidate only
when its bytes are not in the table yet, so the table is also the memo of valid candidates and
a known candidate costs one dict lookup in all (two lookups by the same bytes, one to skip the
checks and one for the row, were ~8 % of a request with varied candidates). Candidates given as
values are keyed by ``candidate_key`` (a JSON array, so never equal to a body's object bytes).
The table is bounded: when full, it starts over (a miss costs one featurization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from featurestore.featurize import Featurizer, SlotIds
from featurestore.schema import SlotSide


def candidate_key(item_id: str, features: Mapping[str, Any]) -> bytes:
    """The table key of a candidate given as values (when no request bytes are at hand)."""
    return orjson.dumps([item_id, features])


class SlotColumn:
    """One slot's IDs of every known candidate: ``flat[start[r]:start[r] + length[r]]``."""

    def __init__(self, capacity: int) -> None:
        self.start = np.zeros(capacity, dtype=np.int64)
        self.length = np.zeros(capacity, dtype=np.int64)
        self.flat = np.zeros(max(capacity, 16), dtype=np.int64)
        self.used = 0  # entries of ``flat`` in use
        self.all_single = True  # every known candidate has exactly one ID here

    def append(self, first_row: int, ids: SlotIds) -> None:
        """Rows ``first_row, first_row + 1, ...`` get the bags of ``ids``."""
        n, size = len(ids.offsets) - 1, len(ids.ids)
        if self.used + size > len(self.flat):
            grown = np.zeros(max(2 * len(self.flat), self.used + size), dtype=np.int64)
            grown[: self.used] = self.flat[: self.used]
            self.flat = grown
        self.flat[self.used : self.used + size] = ids.ids
        rows = slice(first_row, first_row + n)
        self.start[rows] = self.used + ids.offsets[:-1]
        lengths = np.diff(ids.offsets)
        self.length[rows] = lengths
        self.all_single = self.all_single and bool((lengths == 1).all())
        self.used += size

    def gather(self, rows: np.ndarray) -> SlotIds:
        """The jagged IDs of ``rows``, in order."""
        n = len(rows)
        if self.all_single:
            return SlotIds(self.flat[self.start[rows]], np.arange(n + 1, dtype=np.int64))
        lengths = self.length[rows]
        offsets = np.zeros(n + 1, dtype=np.int64)
        lengths.cumsum(out=offsets[1:])
        # position j of the result reads flat[start[row of j] + (j - offsets[row of j])]
        shift = np.repeat(self.start[rows] - offsets[:-1], lengths)
        return SlotIds(self.flat[shift + np.arange(offsets[-1])], offsets)


class CandidateIds:
    """Item-slot IDs per candidate, memoized by the candidate's exact JSON bytes."""

    def __init__(self, featurizer: Featurizer, item_slots: Sequence[str],
                 capacity: int = 200_000, max_key_bytes: int = 16 << 20) -> None:
        self.featurizer = featurizer
        self.item_slots = list(item_slots)
        self.capacity = capacity
        # Keys are request bytes: their total is bounded too, so large candidates from a
        # hostile client cannot grow a worker's memory past it. The parsed candidates kept per
        # row (``items``) cost up to ~12x their JSON as Python objects (short strings in lists):
        # 16 MB of keys stays within ~200 MB.
        self.max_key_bytes = max_key_bytes
        self._reset()

    def _reset(self, at_least: int = 0) -> None:
        self.rows: dict[bytes, int] = {}
        self.items: list[tuple[str, Mapping[str, Any]]] = []  # the candidate of each row
        self._key_bytes = 0
        size = max(self.capacity, at_least)
        self.columns = {s: SlotColumn(size) for s in self.item_slots}

    def __len__(self) -> int:
        return len(self.rows)

    def _add(self, keys: list[bytes], items: list[tuple[str, Mapping[str, Any]]]) -> None:
        first = len(self.rows)
        records = []
        for item_id, feats in items:
            rec = dict(feats)
            rec["item_id"] = item_id
            records.append(rec)
        batch = self.featurizer.featurize(records, SlotSide.ITEM)
        for slot, column in self.columns.items():
            column.append(first, batch.slots[slot])
        for i, key in enumerate(keys):
            self.rows[key] = first + i
        self.items.extend(items)
        self._key_bytes += sum(map(len, keys))

    def slot_ids(self, keys: Sequence[bytes],
                 items: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, SlotIds]:
        """Each item slot's jagged IDs for the candidates ``items`` (keyed by ``keys``)."""
        rows = self.table_rows(keys, items)
        return {s: c.gather(rows) for s, c in self.columns.items()}

    def find(self, keys: Sequence[bytes]) -> list[int | None]:
        """The row of each key, None where the table does not hold it (yet)."""
        return list(map(self.rows.get, keys))

    def add_missing(self, keys: Sequence[bytes], found: list[int | None],
                    missing: Mapping[bytes, tuple[str, Mapping[str, Any]]]) -> list[int]:
        """The rows of ``keys`` after featurizing and adding the ``missing`` candidates.

        ``found`` is :meth:`find` of ``keys``; ``missing`` holds the candidate of each key it
        found None for. A table that would outgrow its bounds starts over with this request's
        candidates only (crude, but a miss only costs one featurization).
        """
        added = sum(map(len, missing))
        if (len(self.rows) + len(missing) > self.capacity
                or self._key_bytes + added > self.max_key_bytes):
            request = {key: missing[key] if row is None else self.items[row]
                       for key, row in zip(keys, found, strict=True)}
            self._reset(len(request))
            missing = request
        self._add(list(missing), list(missing.values()))
        return list(map(self.rows.__getitem__, keys))

    def table_rows(self, keys: Sequence[bytes],
                   items: Sequence[tuple[str, Mapping[str, Any]]]) -> np.ndarray:
        """The table row of each candidate (featurized and added first where missing):
        slot ``s``'s IDs of candidate i are ``columns[s]``'s bag at row ``result[i]``."""
        found = self.find(keys)
        if None in found:
            missing = {key: item for key, row, item in zip(keys, found, items, strict=True)
                       if row is None}
            return np.array(self.add_missing(keys, found, missing), dtype=np.int64)
        return np.array(found, dtype=np.int64)


class UserIds:
    """User-slot IDs per (user, features), memoized by their exact JSON.

    A user's requests repeat within a session, and featurizing the user side (hashing every
    value of every user slot) was ~8 % of a request. Bounded in entries and key bytes like
    :class:`CandidateIds`; when full it starts over. The returned IDs are shared: read only.
    """

    def __init__(self, featurizer: Featurizer, capacity: int = 100_000,
                 max_key_bytes: int = 8 << 20) -> None:
        self.featurizer = featurizer
        self.capacity = capacity
        self.max_key_bytes = max_key_bytes
        self._ids: dict[bytes, dict[str, SlotIds]] = {}
        self._key_bytes = 0

    def __len__(self) -> int:
        return len(self._ids)

    def slot_ids(self, user_id: str, features: Mapping[str, Any]) -> dict[str, SlotIds]:
        """Each user slot's IDs (one bag) for this user and these features."""
        key = orjson.dumps((user_id, features))
        got = self._ids.get(key)
        if got is None:
            record = dict(features)
            record["user_id"] = user_id
            got = self.featurizer.featurize([record], SlotSide.USER).slots
            if (len(self._ids) >= self.capacity
                    or self._key_bytes + len(key) > self.max_key_bytes):
                self._ids.clear()
                self._key_bytes = 0
            self._ids[key] = got
            self._key_bytes += len(key)
        return got
