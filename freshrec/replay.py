"""Replay a stream of labeled events into Kafka: MovieLens-100K in time order, or synthetic.

Pacing: ``speed`` multiplies event time (speed 3600 plays an hour of events per second), and
``max_rate`` caps events per wall second; with neither, events go as fast as the broker takes
them. Every message is keyed by user id, produced idempotently, and its delivery report is
checked: the summary says how many were sent and failed, and a failure makes the exit code 1.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson
from confluent_kafka import Producer
from tqdm import tqdm

from freshrec.kafka import DeliveryTracker, produce_all, producer_config


@dataclass(frozen=True)
class ReplaySummary:
    """What a replay did."""

    sent: int
    failed: int
    seconds: float
    errors: tuple[str, ...] = ()

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One human-readable summary line."""
        return (f"replay: sent={self.sent} failed={self.failed} "
                f"seconds={self.seconds:.1f} rate={self.rate:,.0f}/s")


class _Pacer:
    """Sleeps so that event time and wall time keep the requested ratio and rate."""

    def __init__(self, speed: float | None, max_rate: float | None) -> None:
        self.speed, self.max_rate = speed, max_rate
        self.t0 = time.monotonic()
        self.ts0: float | None = None
        self.count = 0

    def wait(self, ts: float) -> None:
        self.count += 1
        if self.ts0 is None:
            self.ts0 = ts
        due = 0.0
        if self.speed:
            due = max(due, (ts - self.ts0) / self.speed)
        if self.max_rate:
            due = max(due, self.count / self.max_rate)
        delay = self.t0 + due - time.monotonic()
        if delay > 0.002:
            time.sleep(delay)


def _batched(events: Iterable[dict[str, object]], size: int) -> Iterator[list[dict[str, object]]]:
    batch: list[dict[str, object]] = []
    for ev in events:
        batch.append(ev)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def replay(
    events: Iterable[dict[str, object]],
    bootstrap: str,
    topic: str,
    total: int | None = None,
    speed: float | None = None,
    max_rate: float | None = None,
    progress: bool = True,
    producer_overrides: dict[str, object] | None = None,
) -> ReplaySummary:
    """Produce ``events`` (labeled-event dicts) to ``topic``; flush and report deliveries."""
    producer = Producer(producer_config(bootstrap, **(producer_overrides or {})))
    tracker = DeliveryTracker()
    pacer = _Pacer(speed, max_rate)
    paced = bool(speed or max_rate)
    started = time.monotonic()
    bar = tqdm(total=total, unit="ev", disable=not progress, file=sys.stderr, mininterval=0.5)
    for batch in _batched(events, 1 if paced else 2000):
        if paced:
            pacer.wait(float(batch[0]["ts"]))  # type: ignore[arg-type]
        messages = [(str(ev["user_id"]).encode(), orjson.dumps(ev)) for ev in batch]
        produce_all(producer, topic, messages, tracker)
        bar.update(len(batch))
    remaining = producer.flush(60)
    bar.close()
    failed = tracker.failed + remaining
    return ReplaySummary(tracker.delivered, failed, time.monotonic() - started,
                         tuple(tracker.errors))
