"""Impression logging off the request path: a bounded queue drained by one producer thread.

A scoring request only does ``queue.put_nowait`` (~1 µs); serialization and ``produce`` happen
on the background thread. When Kafka is slow or down the queue fills and impressions are
dropped and counted (``freshrec_service_impressions_total{outcome="dropped"}``) rather than
adding latency or memory without bound: a lost impression only costs the trainer one negative
(and the joiner's attribution for a click on it), while a stalled scoring path costs every user.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

import orjson
from confluent_kafka import KafkaError, Producer

from freshrec.metrics import ServiceMetrics

log = logging.getLogger("freshrec.service")


class KafkaSink:
    """The service's one Kafka producer (thread-safe), its delivery accounting and its poller.

    Impressions go through :meth:`offer` (bounded queue, never blocks); ``/v1/events`` calls
    :meth:`produce_now` directly, because the client is waiting for the 202 anyway and
    librdkafka's own queue is the buffer. Delivery reports are served by the thread's polls.
    """

    def __init__(self, producer: Producer, impressions_topic: str, queue_size: int,
                 metrics: ServiceMetrics) -> None:
        self.producer = producer
        self.topic = impressions_topic
        self.metrics = metrics
        self.queue: queue.Queue[tuple[bytes, dict[str, Any]] | None] = queue.Queue(queue_size)
        self.delivered = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._drain, name="impressions", daemon=True)
        self._stopped = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def offer(self, key: bytes, impression: dict[str, Any]) -> bool:
        """Queue an impression; False (and counted) if the queue is full."""
        try:
            self.queue.put_nowait((key, impression))
            return True
        except queue.Full:
            self.metrics.impressions.labels("dropped").inc()
            return False

    def _report(self, err: KafkaError | None, _msg: object) -> None:
        if err is None:
            self.delivered += 1
            self.metrics.impressions.labels("delivered").inc()
        else:
            self.failed += 1
            self.metrics.impressions.labels("failed").inc()

    def produce_now(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce on the caller's thread; raises BufferError when librdkafka's queue is full."""
        self.producer.produce(topic, value=value, key=key)

    def _drain(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.05)
            except queue.Empty:
                self.producer.poll(0)
                if self._stopped.is_set():
                    return
                continue
            if item is None:
                return
            key, impression = item
            value = orjson.dumps(impression, option=orjson.OPT_SERIALIZE_NUMPY)
            while True:
                try:
                    self.producer.produce(self.topic, value=value, key=key,
                                          on_delivery=self._report)
                    break
                except BufferError:
                    self.producer.poll(0.05)
                    if self._stopped.is_set():
                        self.metrics.impressions.labels("dropped").inc()
                        break
            self.producer.poll(0)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then flush the producer (bounded by ``timeout``)."""
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        remaining = self.producer.flush(timeout)
        if remaining:
            log.warning("%d messages not delivered at shutdown", remaining)
