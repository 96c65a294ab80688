"""A bounded window of recently applied event ids, for idempotent updates under redelivery.

Ids are remembered a batch at a time, and forgotten a whole batch at a time, oldest first, once
the batches after it hold at least ``capacity`` ids. So every one of the last ``capacity``
remembered ids is always caught, at most one batch more is held, and a batch costs a few set
operations in C instead of a Python step per id.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np


class RecentIds:
    """The ids remembered by :meth:`admit`, the newest ``capacity`` (or a batch more) of them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = int(capacity)
        self._ids: set[str] = set()
        self._batches: deque[list[str]] = deque()
        self._held = 0

    def admit(self, ids: Sequence[str]) -> np.ndarray:
        """Which of ``ids`` are new (bool mask); the new ones are remembered. An id seen before
        in the window, or earlier in ``ids``, is not new."""
        ids = list(ids)
        if self._ids.isdisjoint(ids) and len(set(ids)) == len(ids):  # the usual batch
            keep = np.ones(len(ids), dtype=bool)
            fresh = ids
        else:
            keep = np.zeros(len(ids), dtype=bool)
            fresh, batch = [], set()
            for i, e in enumerate(ids):
                if e not in self._ids and e not in batch:
                    batch.add(e)
                    fresh.append(e)
                    keep[i] = True
        if fresh:
            self._ids.update(fresh)
            self._batches.append(fresh)
            self._held += len(fresh)
            while self._batches and self._held - len(self._batches[0]) >= self.capacity:
                old = self._batches.popleft()
                self._ids.difference_update(old)
                self._held -= len(old)
        return keep

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __iter__(self) -> Iterator[str]:
        """Oldest first."""
        for batch in self._batches:
            yield from batch

    def __len__(self) -> int:
        return self._held
