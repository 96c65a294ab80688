"""Producing to and reading back from the real test broker."""

from __future__ import annotations

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from freshrec.kafka import (  # noqa: F401 - drain_topic is re-exported for tests
    DeliveryTracker,
    consumer_config,
    drain_topic,
    produce_all,
    producer_config,
)


def produce(bootstrap: str, topic: str, values: list[bytes], keys: list[bytes] | None = None
            ) -> None:
    """Produce raw values and fail the test if any delivery fails."""
    producer = Producer(producer_config(bootstrap))
    tracker = DeliveryTracker()
    keys = keys or [b"k"] * len(values)
    produce_all(producer, topic, list(zip(keys, values, strict=True)), tracker)
    assert producer.flush(30) == 0
    assert tracker.failed == 0, tracker.errors
    assert tracker.delivered == len(values)


def produce_events(bootstrap: str, topic: str, events: list[dict]) -> None:
    """Produce labeled-event dicts keyed by user id."""
    produce(bootstrap, topic, [orjson.dumps(e) for e in events],
            [str(e.get("user_id", "")).encode() for e in events])


def read_topic(bootstrap: str, topic: str, expected: int, idle_s: float = 5.0) -> list[Message]:
    """Every message of ``topic`` from offset 0 until ``expected`` or ``idle_s`` of silence."""
    consumer = Consumer(consumer_config(bootstrap, f"read-{topic}"))
    # Assign rather than subscribe: no group join to wait for, and every partition from 0.
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[Message] = []
    idle = 0.0
    try:
        while len(out) < expected and idle < idle_s:
            msgs = [m for m in consumer.consume(10_000, timeout=0.5) if not m.error()]
            idle = 0.0 if msgs else idle + 0.5
            out.extend(msgs)
        # Anything beyond ``expected`` would be a duplicate: give it a moment to show up.
        out.extend(m for m in consumer.consume(10_000, timeout=1.0) if not m.error())
    finally:
        consumer.close()
    return out

