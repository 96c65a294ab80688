"""A consumed batch of labeled events in the form the learner takes it.

Two paths produce it: the compiled wire scanner (:mod:`featurestore.wire_scan`, columns straight
from the message bytes) and the struct path (:meth:`LabeledBatch.of_events`, parsed events
featurized). Whatever needs the events themselves (exploration statistics, the audit log,
isolating a failing event) reads :attr:`LabeledBatch.events`, decoded on first use, so the
common batch never builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np

from featurestore.events import decode_labeled_events
from featurestore.featurize import Featurizer, SparseBatch

_LABEL, _TS, _SAMPLE_RATE, _EVENT_ID = map(attrgetter,
                                           ("label", "ts", "sample_rate", "event_id"))


@dataclass(frozen=True)
class BatchContexts:
    """The bandit contexts logged with a batch's events, as arrays.

    ``counts[i]``: the number of clusters of event i's context, -1 when it has none;
    ``clusters[i, :counts[i]]`` and ``weights[i, :counts[i]]``: the context (zeros after).
    """

    counts: np.ndarray  # int64 (n,)
    clusters: np.ndarray  # int64 (n, width)
    weights: np.ndarray  # float64 (n, width)

    @classmethod
    def of_events(cls, events: Sequence[Any]) -> BatchContexts | None:
        """The contexts of parsed events (``None`` when no event has one)."""
        if all(e.context is None for e in events):
            return None
        width = max([len(e.context.clusters) for e in events if e.context is not None] + [1])
        counts = np.full(len(events), -1, dtype=np.int64)
        clusters = np.zeros((len(events), width), dtype=np.int64)
        weights = np.zeros((len(events), width))
        for i, e in enumerate(events):
            if e.context is not None:
                k = counts[i] = len(e.context.clusters)
                clusters[i, :k] = e.context.clusters
                weights[i, :k] = e.context.weights
        return cls(counts, clusters, weights)


class LabeledBatch:
    """Jagged IDs per slot, labels, timestamps and sample rates of a batch of events.

    ``sample_rates``: each event's rate of kept negatives (1.0 where unset), or ``None`` when
    no event of the batch has one.
    """

    __slots__ = ("_event_ids", "_events", "_values", "contexts", "labels", "sample_rates",
                 "sparse", "ts")

    def __init__(self, sparse: SparseBatch, labels: np.ndarray, ts: np.ndarray,
                 sample_rates: np.ndarray | None, *, contexts: BatchContexts | None = None,
                 events: list[Any] | None = None, values: list[bytes] | None = None,
                 event_ids: Callable[[], list[str]] | None = None) -> None:
        if events is None and values is None:
            raise ValueError("a labeled batch needs its events or their message values")
        self.sparse = sparse
        self.labels = labels
        self.ts = ts
        self.sample_rates = sample_rates
        self.contexts = contexts
        self._events = events
        self._values = values
        self._event_ids = event_ids

    def __len__(self) -> int:
        return self.sparse.size

    @property
    def events(self) -> list[Any]:
        """The parsed events (decoded from the message values on first use)."""
        if self._events is None:
            self._events = decode_labeled_events(self._values or [])
        return self._events

    def event_ids(self) -> list[str]:
        """Each event's id (without decoding the events when the scanner left their spans)."""
        if self._events is None and self._event_ids is not None:
            return self._event_ids()
        return list(map(_EVENT_ID, self.events))

    @classmethod
    def of_events(cls, events: Sequence[Any], featurizer: Featurizer) -> LabeledBatch:
        """Parsed events, featurized."""
        n = len(events)
        rates = None
        if any(map(_SAMPLE_RATE, events)):  # a rate is > 0 when set
            rates = np.fromiter((e.sample_rate or 1.0 for e in events), np.float64, count=n)
        return cls(featurizer.featurize_events(events),
                   np.fromiter(map(_LABEL, events), dtype=np.float64, count=n),
                   np.fromiter(map(_TS, events), dtype=np.float64, count=n), rates,
                   contexts=BatchContexts.of_events(events), events=list(events))
