"""Impression logging off the request path: a bounded buffer drained by one producer thread.

A scoring request only appends to a deque (~0.1 µs, no lock, no thread wake-up); the producer
thread wakes every 20 milliseconds, serializes whatever accumulated and hands it to librdkafka.
(A ``queue.Queue`` cost a lock and a condition notify per request, and woke the thread — a
context switch and a GIL hand-off — for every impression: ~8 % of a worker's time at load.)
When Kafka is slow or down the buffer fills and impressions are dropped and counted
(``freshrec_service_impressions_total{outcome="dropped"}``) rather than adding latency or memory
without bound: a lost impression only costs the trainer one negative (and the joiner's
attribution for a click on it), while a stalled scoring path costs every user.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer

from freshrec.kafka import producer_is_stuck
from freshrec.metrics import ServiceMetrics

log = logging.getLogger("freshrec.service")


class KafkaSink:
    """The service's one Kafka producer (thread-safe), its delivery accounting and its poller.

    Impressions go through :meth:`offer` (bounded buffer, never blocks); ``/v1/events`` calls
    :meth:`produce_now` directly, because the client is waiting for the 202 anyway and
    librdkafka's own queue is the buffer. Delivery reports are served by the thread's polls.
    """

    def __init__(self, producer: Producer, impressions_topic: str, queue_size: int,
                 metrics: ServiceMetrics, drain_interval_s: float = 0.02,
                 make_producer: Callable[[], Producer] | None = None) -> None:
        self.producer = producer
        # A fatal or stalled producer (``producer_is_stuck``; e.g. an idempotent producer whose
        # broker lost its producer id) never delivers again: the only way on is a new producer.
        # Without a factory the error surfaces (503s, failed counts).
        self.make_producer = make_producer
        self._replace_lock = threading.Lock()
        self._stuck: Producer | None = None  # set by delivery reports, replaced by the thread
        self.topic = impressions_topic
        self.metrics = metrics
        self.queue_size = queue_size
        self.drain_interval_s = drain_interval_s
        # Appends (event loop) and pops (producer thread) of a deque are atomic under the GIL.
        self.pending: deque[tuple[bytes, dict[str, Any]]] = deque()
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._drain, name="impressions", daemon=True)
        # Labelled children resolved once: ``labels()`` locks and builds a key on every call,
        # and delivery reports arrive once per impression.
        self._delivered = metrics.impressions.labels("delivered")
        self._failed = metrics.impressions.labels("failed")
        self._dropped = metrics.impressions.labels("dropped")
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def offer(self, key: bytes, impression: dict[str, Any]) -> bool:
        """Buffer an impression; False (and counted) if the buffer is full."""
        if len(self.pending) >= self.queue_size:
            self._dropped.inc()
            return False
        self.pending.append((key, impression))
        return True

    def _report(self, err: KafkaError | None, _msg: object) -> None:
        if err is None:
            self.delivered += 1
            self._delivered.inc()
        else:
            self.failed += 1
            self._failed.inc()
            self._watch(err, _msg)

    def _watch(self, err: KafkaError | None, _msg: object) -> None:
        """Delivery report of any message: flags the producer that reported it if it is stuck.

        Runs inside ``poll()``; the drain thread replaces the producer after the poll returns.
        """
        if err is not None and producer_is_stuck(err):
            self._stuck = self.producer

    def produce_now(self, topic: str, key: bytes, value: bytes,
                    headers: list[tuple[str, bytes]] | None = None) -> None:
        """Produce on the caller's thread.

        Raises BufferError when librdkafka's queue is full and KafkaException when the message
        cannot be queued (unknown topic, a fatal producer error that a new producer did not
        cure): the caller answers "retry later", nothing was accepted.
        """
        kwargs: dict[str, Any] = {"value": value, "key": key, "on_delivery": self._watch}
        if headers is not None:
            kwargs["headers"] = headers
        producer = self.producer
        try:
            producer.produce(topic, **kwargs)
        except KafkaException as exc:
            if not self._renewed_after(producer, exc):
                raise
            self.producer.produce(topic, **kwargs)

    def _renewed_after(self, failed: Producer, exc: KafkaException) -> bool:
        """Replace ``failed`` by a new producer if ``exc`` is fatal; True if one is in place."""
        err = exc.args[0] if exc.args else None
        return producer_is_stuck(err) and self._replace(failed, err)

    def _replace(self, failed: Producer, why: object) -> bool:
        """Put a new producer in place of ``failed``; False without a factory."""
        if self.make_producer is None:
            return False
        with self._replace_lock:
            if self.producer is failed:  # not already replaced by the other thread
                log.error("Kafka producer is stuck (%s): starting a new one", why)
                self.producer = self.make_producer()
                self.metrics.producer_renewals.inc()
        return True

    def _drain(self) -> None:
        pending = self.pending
        while True:
            stopping = self._stopped.is_set()
            while pending:
                key, impression = pending.popleft()
                self._produce(key, orjson.dumps(impression, option=orjson.OPT_SERIALIZE_NUMPY))
            self.producer.poll(0)
            stuck, self._stuck = self._stuck, None
            if stuck is not None:
                self._replace(stuck, "messages expired undelivered")
            if stopping:
                return
            self._stopped.wait(self.drain_interval_s)

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            producer = self.producer
            try:
                producer.produce(self.topic, value=value, key=key, on_delivery=self._report)
                return
            except BufferError:
                producer.poll(0.05)
                if self._stopped.is_set():
                    self._dropped.inc()
                    return
            except KafkaException as exc:
                if self._renewed_after(producer, exc):
                    continue
                # Cannot be queued (e.g. the topic is missing): this impression is lost and
                # counted; the thread lives on for the next ones.
                self.failed += 1
                self._failed.inc()
                return

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered, then flush the producer (bounded by ``timeout``)."""
        self._stopped.set()
        self._thread.join(timeout)
        remaining = self.producer.flush(timeout)
        if remaining:
            log.warning("%d messages not delivered at shutdown", remaining)
