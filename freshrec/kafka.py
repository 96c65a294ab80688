"""Kafka plumbing shared by every process: client configs, topic creation, delivery checking.

Configs use the real librdkafka keys. Producers are idempotent (``enable.idempotence``) so a
retried send cannot duplicate or reorder a partition's messages; consumers never auto-commit,
because the trainer commits only offsets covered by a durable checkpoint.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger("freshrec.kafka")


def producer_config(bootstrap: str, **extra: object) -> dict[str, object]:
    """An idempotent, batching producer."""
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        "message.timeout.ms": 30_000,
    }
    conf.update(extra)
    return conf


def producer_is_stuck(err: object) -> bool:
    """True for the delivery or produce errors after which this producer instance is done.

    A fatal error is permanent for a librdkafka instance: the error that caused it carries
    ``fatal()`` and every later produce call fails with ``_FATAL``. A delivery timeout is the
    other sign: an idempotent producer whose broker lost its producer id and sequence numbers
    (a broker restarted without its data) waits for them forever, and every message it holds
    expires after ``message.timeout.ms``; on the test broker that happened after two of three
    restarts. A new producer (a new producer id) delivers at once; after a plain outage that
    outlasted the timeout, replacing it costs nothing.
    """
    return isinstance(err, KafkaError) and (
        err.fatal() or err.code() in (KafkaError._FATAL, KafkaError._MSG_TIMED_OUT))


def dead_letter_headers(reason: str, source_topic: str, source_partition: int,
                        source_offset: int) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter message: why it was refused and where it came from.

    The trainer's format (``reason`` capped at 1 KiB, ``source_topic``/``_partition``/
    ``_offset``), used by every producer of ``topic_dlq`` so one reader understands them all.
    Messages that never were in Kafka (refused by ``POST /v1/events``) carry partition and
    offset -1 and a ``source_topic`` naming the route.
    """
    return [("reason", reason.encode()[:1024]),
            ("source_topic", source_topic.encode()),
            ("source_partition", str(source_partition).encode()),
            ("source_offset", str(source_offset).encode())]


def consumer_config(bootstrap: str, group_id: str, **extra: object) -> dict[str, object]:
    """A manually committing consumer that starts at the earliest offset of a new group."""
    conf: dict[str, object] = {
        "bootstrap.servers": bootstrap,
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 10,
        "fetch.min.bytes": 1,
        "queued.max.messages.kbytes": 262_144,
        "session.timeout.ms": 10_000,
        "partition.assignment.strategy": "cooperative-sticky",
    }
    conf.update(extra)
    return conf


def wait_for_broker(bootstrap: str, timeout: float = 30.0) -> None:
    """Block until the broker answers a metadata request, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    # Wait for the listening socket first: librdkafka logs every refused connection.
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin.list_topics(timeout=2)
            return
        except KafkaException as exc:
            last = exc
            time.sleep(0.2)
    raise TimeoutError(f"Kafka at {bootstrap} did not answer within {timeout:.0f}s: {last}")


def create_topics(bootstrap: str, topics: list[str], partitions: int,
                  timeout: float = 30.0) -> None:
    """Create ``topics`` if missing (existing ones are left as they are)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [NewTopic(t, num_partitions=partitions, replication_factor=1)
              for t in topics if t not in existing]
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"creating topic {topic}: {exc}") from exc
    # Metadata propagates asynchronously; wait until every topic shows all its partitions.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout).topics
        if all(t in md and len(md[t].partitions) == partitions for t in topics
               if t not in existing):
            return
        time.sleep(0.1)


@dataclass
class DeliveryTracker:
    """Counts delivery reports so that a failed send is an error, not silence."""

    delivered: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def __call__(self, err: KafkaError | None, _msg: object) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            if len(self.errors) < 10:
                self.errors.append(str(err))


def records(messages: list[Message], logger: logging.Logger) -> Iterator[Message]:
    """The consumed messages that carry a record, in order.

    The others report a consumer error: logged to ``logger`` and skipped (reaching the end of a
    partition is not an error and is skipped silently).
    """
    for msg in messages:
        err = msg.error()
        if err is None:
            yield msg
        elif err.code() != KafkaError._PARTITION_EOF:
            logger.warning("consumer error: %s", err)


def produce_all(producer: Producer, topic: str, messages: list[tuple[bytes, bytes]],
                tracker: DeliveryTracker) -> None:
    """Produce (key, value) pairs, polling on back-pressure; does not flush."""
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=tracker)
                break
            except BufferError:
                producer.poll(0.05)
    producer.poll(0)


def assign_from(consumer: Consumer, partitions: list[TopicPartition],
                offsets: dict[tuple[str, int], int]) -> None:
    """Assign ``partitions``, each starting at its offset in ``offsets`` where there is one.

    Used from ``on_assign`` by the processes that checkpoint their own offsets: the state they
    restored is only consistent with exactly those positions, not with whatever was committed.
    A partition we hold no offset for (new to us, or handed back after a rebalance) starts at
    the group's committed offset, which is then recorded in ``offsets`` too, so that
    :class:`TruncationWatch` knows where we stand before the first record arrives.
    """
    missing = [TopicPartition(tp.topic, tp.partition) for tp in partitions
               if (tp.topic, tp.partition) not in offsets]
    if missing:
        try:
            for tp in consumer.committed(missing, timeout=10):
                if tp.error is None and tp.offset >= 0:
                    offsets[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as exc:  # the group's own offset lookup applies instead
            log.warning("committed offsets unavailable: %s", exc)
    for tp in partitions:
        restored = offsets.get((tp.topic, tp.partition))
        if restored is not None:
            tp.offset = restored
    consumer.assign(partitions)


@dataclass(frozen=True)
class Rewound:
    """A partition moved back to the start of its new log by :class:`TruncationWatch`."""

    topic: str
    partition: int
    position: int
    start: int
    high: int

    def __str__(self) -> str:
        return (f"{self.topic}[{self.partition}] {self.position} -> {self.start} "
                f"(log ends at {self.high})")


class TruncationWatch:
    """Notices a partition whose log now ends below the position we resume from.

    A topic deleted and recreated, a broker that lost its data, or an unclean leader election
    leave a consumer positioned past the end of the new log. Apache Kafka answers such a fetch
    with OFFSET_OUT_OF_RANGE and librdkafka applies ``auto.offset.reset``; a broker that
    instead answers with empty fetches parks the consumer until the new log grows past the old
    position, silently skipping everything produced meanwhile.

    Fed with the high watermarks librdkafka caches from fetch responses, a partition is
    declared truncated when, at an unchanged position (nothing received),

    - its high watermark grew while staying below the position: records were appended at
      offsets we will never fetch; or
    - its high watermark stayed below the position for ``stuck_after_s``: a fetch response's
      watermark can trail our position for a moment, never for that long.
    """

    def __init__(self, stuck_after_s: float = 30.0) -> None:
        self.stuck_after_s = stuck_after_s
        # (topic, partition) -> (position, lowest high watermark seen there, since when).
        self._parked: dict[tuple[str, int], tuple[int, int, float]] = {}

    def observe(self, key: tuple[str, int], position: int, high: int, now: float) -> bool:
        """One check of one partition; True when its log provably restarted below ``position``."""
        if high < 0 or high >= position:
            self._parked.pop(key, None)
            return False
        seen = self._parked.get(key)
        if seen is None or seen[0] != position:
            self._parked[key] = (position, high, now)
            return False
        if high > seen[1] or now - seen[2] >= self.stuck_after_s:
            del self._parked[key]
            return True
        if high < seen[1]:
            self._parked[key] = (position, high, seen[2])
        return False

    def rewind(self, consumer: Consumer, offsets: dict[tuple[str, int], int]) -> list[Rewound]:
        """Check every assigned partition in ``offsets``; seek the truncated ones to their start.

        ``offsets`` (next offset to read, per partition) is updated in place; returns the
        rewound partitions (each logged) for the caller's metrics and checkpoint.
        """
        rewound: list[Rewound] = []
        try:
            assigned = consumer.assignment()
        except KafkaException as exc:
            log.debug("truncation check unavailable: %s", exc)
            return rewound
        for tp in assigned:
            key = (tp.topic, tp.partition)
            position = offsets.get(key)
            if position is None:
                continue
            low, high = consumer.get_watermark_offsets(tp, cached=True)
            if not self.observe(key, position, high, time.monotonic()):
                continue
            start = max(low, 0)
            try:
                consumer.seek(TopicPartition(tp.topic, tp.partition, start))
            except KafkaException as exc:  # not fetching yet: the next check proves it again
                log.warning("cannot rewind %s[%d]: %s", tp.topic, tp.partition, exc)
                continue
            offsets[key] = start
            rewound.append(Rewound(tp.topic, tp.partition, position, start, high))
            log.warning("log truncated below our position, resuming from its start: %s",
                        rewound[-1])
        return rewound


def commit_offsets(consumer: Consumer, offsets: dict[tuple[str, int], int]) -> bool:
    """Synchronously commit next-offsets (after the checkpoint that stores them is durable).

    A failure (broker restarting, group rebalancing) is logged and returns False instead of
    raising: the trainer and the joiner resume from the offsets in their own checkpoint, so the
    group's committed offsets only feed lag monitoring, and crashing on them would turn a broker
    restart into a crash loop. The next checkpoint commits again.
    """
    if not offsets:
        return True
    try:
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                        asynchronous=False)
    except KafkaException as exc:
        log.warning("offset commit failed (next checkpoint retries): %s", exc)
        return False
    return True


def drain_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> list[Message]:
    """Every message of ``topic`` up to its end, however long delivery of the tail takes.

    The end is marked by a sentinel produced into every partition now (key ``b"__end__:"`` and
    a random suffix; sentinels of every call are left out of the result): once each partition's
    own sentinel is read, everything produced before this call has been read too. Call it after
    the writers stopped. A time-based read would return early and miss a duplicate that shows up
    a second later.
    """
    consumer = Consumer(consumer_config(bootstrap, f"drain-{topic}"))
    partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    producer = Producer(producer_config(bootstrap))
    marker = b"__end__:" + uuid.uuid4().hex.encode()
    for p in partitions:
        producer.produce(topic, value=b"", key=marker, partition=p)
    assert producer.flush(30) == 0
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    out: list[Message] = []
    open_parts = set(partitions)
    deadline = time.monotonic() + timeout
    try:
        while open_parts:
            assert time.monotonic() < deadline, f"{topic}: no end marker in {open_parts}"
            for m in consumer.consume(10_000, timeout=0.5):
                if m.error():
                    continue
                key = m.key() or b""
                if key == marker:
                    open_parts.discard(m.partition())
                elif not key.startswith(b"__end__:"):
                    out.append(m)
    finally:
        consumer.close()
    return out
