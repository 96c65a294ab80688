"""The service's producer wrapper keeps working through producer errors (unit: fake producers)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

from freshrec.metrics import ServiceMetrics
from service.impressions import KafkaSink


class _FakeProducer:
    """Records produced messages; raises ``errors`` (in order) on the first produce calls."""

    def __init__(self, errors: list[KafkaException] | None = None) -> None:
        self.errors = list(errors or [])
        self.sent: list[tuple[str, bytes]] = []

    def produce(self, topic: str, value: bytes, key: bytes, **_: object) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.sent.append((topic, value))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        return 0


def _fatal() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._FATAL, "unknown producer id", fatal=True))


def _after_fatal() -> KafkaException:
    """What every produce call raises once the producer is fatal: code _FATAL, no flag."""
    return KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message"))


def _unknown_topic() -> KafkaException:
    return KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC, "no such topic"))


def _metrics() -> ServiceMetrics:
    return ServiceMetrics(registry=CollectorRegistry())


@pytest.mark.parametrize("error", [_fatal, _after_fatal])
def test_a_fatal_error_gets_a_new_producer_and_the_message_goes_through(error) -> None:
    broken, fresh = _FakeProducer([error()]), _FakeProducer()
    metrics = _metrics()
    sink = KafkaSink(broken, "imps", 10, metrics, make_producer=lambda: fresh)
    sink.produce_now("events", b"u1", b"e1")
    assert fresh.sent == [("events", b"e1")] and sink.producer is fresh
    assert metrics.registry.get_sample_value("freshrec_service_producer_renewals_total") == 1


def test_without_a_factory_or_for_other_errors_the_caller_hears_it() -> None:
    sink = KafkaSink(_FakeProducer([_fatal()]), "imps", 10, _metrics())
    with pytest.raises(KafkaException):
        sink.produce_now("events", b"u1", b"e1")
    sink = KafkaSink(_FakeProducer([_unknown_topic()]), "imps", 10, _metrics(),
                     make_producer=_FakeProducer)
    with pytest.raises(KafkaException):  # not fatal: no new producer, the route answers 503
        sink.produce_now("events", b"u1", b"e1")


def test_the_impression_thread_survives_errors_and_counts_what_it_lost() -> None:
    broken, fresh = _FakeProducer([_unknown_topic(), _fatal()]), _FakeProducer()
    sink = KafkaSink(broken, "imps", 10, _metrics(), drain_interval_s=0.001,
                     make_producer=lambda: fresh)
    sink.start()
    for i in range(3):
        assert sink.offer(b"u", {"request_id": f"r{i}"})
    deadline = time.monotonic() + 5
    while len(fresh.sent) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    sink.close(1.0)
    # r0: topic missing, lost and counted; r1: fatal error, sent by the new producer; r2 too.
    assert sink.failed == 1
    assert [v for _, v in fresh.sent] == [b'{"request_id":"r1"}', b'{"request_id":"r2"}']


class _StalledProducer(_FakeProducer):
    """Accepts messages, then reports every one of them as expired undelivered."""

    def produce(self, topic: str, value: bytes, key: bytes, **kw: object) -> None:
        super().produce(topic, value, key)
        self.callbacks = [*getattr(self, "callbacks", []), kw.get("on_delivery")]

    def poll(self, _timeout: float = 0) -> int:
        expired = KafkaError(KafkaError._MSG_TIMED_OUT, "Message timed out")
        for callback in getattr(self, "callbacks", []):
            callback(expired, None)
        self.callbacks = []
        return 0


@pytest.mark.parametrize("path", ["impression", "event"])
def test_a_producer_whose_messages_expire_is_replaced(path: str) -> None:
    """An idempotent producer whose broker lost its producer id stalls without a fatal error:
    its messages only expire. The thread replaces it; later messages go through."""
    stalled, fresh = _StalledProducer(), _FakeProducer()
    metrics = _metrics()
    sink = KafkaSink(stalled, "imps", 10, metrics, drain_interval_s=0.001,
                     make_producer=lambda: fresh)
    sink.start()
    if path == "impression":
        assert sink.offer(b"u", {"request_id": "lost"})
    else:
        sink.produce_now("events", b"u", b"lost")
    deadline = time.monotonic() + 5
    while sink.producer is not fresh and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.producer is fresh
    sink.produce_now("events", b"u", b"e2")
    sink.close(1.0)
    assert fresh.sent == [("events", b"e2")]
    assert metrics.registry.get_sample_value("freshrec_service_producer_renewals_total") == 1
    assert sink.failed == (1 if path == "impression" else 0)
