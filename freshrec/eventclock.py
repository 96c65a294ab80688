"""Event time as untrusted input: the future-skew check and a watermark no single event can push.

Event timestamps come from clients (``POST /v1/events``, impressions, clicks). Two processes let
event time drive state: the trainer expires embedding rows and bandit statistics by it, and the
joiner closes attribution windows by it. If either followed the newest timestamp seen, one event
dated 2096 would expire every row at the next sweep, or close every window at once.

Two defences, both here so the trainer and the joiner apply the same rule:

* :func:`future_skew_reason` — an event later than wall clock + ``event_max_future_skew_s`` is
  refused (dead-lettered by the caller, with this reason). Wall clock bounds the future only:
  historical replays (MovieLens ratings from 1998) are far in the past and pass.
* :class:`EventClock` — the watermark is a low quantile of the last ``window`` accepted event
  times, and it never moves backwards. Moving it needs a ``1 - quantile`` share of the recent
  stream to be newer, so one event (or a handful among thousands) cannot; a replay, where every
  event moves forward together, moves it at the speed of the stream, lagging the newest event by
  about ``(1 - quantile) * window`` events.
"""

from __future__ import annotations

import math
import time

import numpy as np

# Defaults, with the reasoning: 1,024 events is a fraction of a second of a production stream
# (the lag is negligible against TTLs of days and windows of minutes), and the median needs 512
# coordinated events to move, far beyond what one client posting a bad timestamp does.
DEFAULT_WINDOW = 1024
DEFAULT_QUANTILE = 0.5


def future_skew_reason(ts: float, max_future_skew_s: float, wall: float | None = None
                       ) -> str | None:
    """Why an event at ``ts`` is refused (dated beyond wall clock + skew), or None if it is not."""
    now = time.time() if wall is None else wall
    if ts > now + max_future_skew_s:
        return (f"ts: {ts:.3f} is {ts - now:.0f} s ahead of wall clock "
                f"(event_max_future_skew_s = {max_future_skew_s:g})")
    return None


class EventClock:
    """A monotone event-time watermark: the ``quantile`` of the last ``window`` accepted times.

    ``now`` is ``-inf`` until the first observation. :meth:`clamp` caps it at a bound (restoring
    a checkpoint written by an older version, whose clock may have been pushed by one event).

    >>> c = EventClock(window=4, quantile=0.5)
    >>> c.observe([10.0, 11.0, 12.0, 13.0])
    11.0
    >>> c.observe([4.0e9])  # one outlier moves the median by one rank, not to 2096
    12.0

    The quantile is recomputed every ``window // 16`` observations (the joiner observes one
    event at a time), which adds at most that many events of lag.
    """

    def __init__(self, window: int = DEFAULT_WINDOW, quantile: float = DEFAULT_QUANTILE) -> None:
        if window < 1 or not 0.0 <= quantile <= 1.0:
            raise ValueError("window must be >= 1 and quantile in [0, 1]")
        self.window = int(window)
        self.quantile = float(quantile)
        self._ring = np.empty(self.window, dtype=np.float64)
        self._n = 0  # observations so far (the ring holds the last min(n, window))
        self._every = max(1, self.window // 16)
        self._computed_at = 0
        self._now = -math.inf

    @property
    def now(self) -> float:
        """The watermark (``-inf`` before any event)."""
        return self._now

    def observe(self, ts: np.ndarray | list[float]) -> float:
        """Add accepted event times (already skew-checked) and return the new watermark."""
        t = np.asarray(ts, dtype=np.float64).ravel()
        t = t[np.isfinite(t)]
        if t.size == 0:
            return self._now
        if t.size >= self.window:
            self._ring[:] = t[-self.window:]
            self._n += t.size
        else:
            start = self._n % self.window
            first = min(t.size, self.window - start)
            self._ring[start:start + first] = t[:first]
            self._ring[:t.size - first] = t[first:]
            self._n += t.size
        return self._advance()

    def observe_one(self, ts: float) -> float:
        """:meth:`observe` of one event time, without building an array (the joiner calls this
        once per message: the array path's numpy calls cost more than the rest of it)."""
        if not math.isfinite(ts):
            return self._now
        self._ring[self._n % self.window] = ts
        self._n += 1
        return self._advance()

    def _advance(self) -> float:
        """Recompute the watermark every ``window / 16`` observations; it never moves back."""
        if self._n - self._computed_at < self._every and self._now != -math.inf:
            return self._now
        self._computed_at = self._n
        filled = self._ring[:min(self._n, self.window)]
        k = int(self.quantile * (len(filled) - 1))
        candidate = float(np.partition(filled, k)[k])
        if candidate > self._now:
            self._now = candidate
        return self._now

    def clamp(self, upper: float) -> None:
        """Never report a time beyond ``upper`` (e.g. wall clock + skew at restore)."""
        if self._now > upper:
            self._now = upper
        np.minimum(self._ring, upper, out=self._ring)

    def state(self) -> dict[str, object]:
        """JSON-able state for checkpoints (the ring in time order, and the watermark)."""
        n = min(self._n, self.window)
        start = self._n % self.window if self._n >= self.window else 0
        ring = np.roll(self._ring[:n], -start) if n else self._ring[:0]
        return {"now": None if self._now == -math.inf else self._now, "recent": ring.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, object], window: int = DEFAULT_WINDOW,
                   quantile: float = DEFAULT_QUANTILE) -> EventClock:
        """Inverse of :meth:`state`."""
        c = cls(window, quantile)
        recent = [float(x) for x in state.get("recent", []) or []]  # type: ignore[union-attr]
        if recent:
            c.observe(recent)
        saved = state.get("now")
        c._now = -math.inf if saved is None else float(saved)  # type: ignore[arg-type]
        return c


class PartitionedClock:
    """One :class:`EventClock` per partition of a topic; ``now`` is the slowest partition's.

    Partitions are consumed at independent speeds (after a restart one may be seconds of backlog
    ahead of another), so a clock over the merged stream runs ahead of the partition that lags,
    and the caller treats its events as already passed. The minimum over partitions seen so far
    is the event time that every partition has reached (Kafka Streams and Flink take the same
    minimum). A partition that never delivered anything is not waited for, unless announced
    with :meth:`expect` (an assigned partition whose backlog has not been read yet).

    >>> c = PartitionedClock(window=4)
    >>> c.observe(0, 100.0); c.observe(1, 50.0)
    100.0
    50.0
    >>> c.now
    50.0
    """

    def __init__(self, window: int = DEFAULT_WINDOW, quantile: float = DEFAULT_QUANTILE) -> None:
        self.window, self.quantile = window, quantile
        self._clocks: dict[int, EventClock] = {}
        self._now = -math.inf

    @property
    def now(self) -> float:
        """The minimum of the partitions' watermarks (``-inf`` before any event)."""
        return self._now

    def observe(self, partition: int, ts: float) -> float:
        """Add one accepted event time of ``partition``; the new overall watermark."""
        clock = self._clocks.get(partition)
        if clock is None:
            clock = self._clocks[partition] = EventClock(self.window, self.quantile)
        before = clock.now
        after = clock.observe_one(ts)
        if after != before:
            self._now = min(c.now for c in self._clocks.values())
        return self._now

    def expect(self, partitions: list[int]) -> None:
        """Wait for ``partitions`` too (assigned, nothing read yet): until each delivers an
        event or :meth:`forget_empty` drops it, ``now`` stays ``-inf``."""
        for p in partitions:
            if p not in self._clocks:
                self._clocks[p] = EventClock(self.window, self.quantile)
        self._recompute()

    def forget_empty(self) -> None:
        """Stop waiting for the partitions that have delivered nothing (empty, or silent)."""
        for p in [p for p, c in self._clocks.items() if c.now == -math.inf]:
            del self._clocks[p]
        self._recompute()

    def _recompute(self) -> None:
        self._now = min((c.now for c in self._clocks.values()), default=-math.inf)

    def partition_times(self) -> dict[int, float]:
        """Each partition's own watermark (partitions that have delivered an event)."""
        return {p: c.now for p, c in self._clocks.items()}

    def clamp(self, upper: float) -> None:
        """Cap every partition's clock at ``upper``."""
        for clock in self._clocks.values():
            clock.clamp(upper)
        if self._now > upper:
            self._now = upper

    def state(self) -> dict[str, object]:
        """JSON-able state: each partition's :meth:`EventClock.state`."""
        return {"partitions": {str(p): c.state() for p, c in self._clocks.items()}}

    @classmethod
    def from_state(cls, state: object, window: int = DEFAULT_WINDOW,
                   quantile: float = DEFAULT_QUANTILE) -> PartitionedClock:
        """Inverse of :meth:`state`; anything else (an older format) gives an empty clock."""
        c = cls(window, quantile)
        parts = state.get("partitions") if isinstance(state, dict) else None
        if isinstance(parts, dict):
            for p, s in parts.items():
                c._clocks[int(p)] = EventClock.from_state(s, window, quantile)
            if c._clocks:
                c._now = min(x.now for x in c._clocks.values())
        return c
