"""Replays deliver every event to a real broker; an independent consumer counts them."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer

from freshrec.data import DataError, fetch_movielens, load_movielens
from freshrec.devstack import free_port
from freshrec.kafka import consumer_config
from freshrec.replay import replay
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.integration.kafka_helpers import read_topic

SHARED_COPY = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"

pytestmark = pytest.mark.integration


def consume_all(settings: Settings, topic: str, expected: int) -> list[dict]:
    """Every message of ``topic`` as parsed JSON."""
    return [orjson.loads(m.value()) for m in read_topic(settings.kafka_bootstrap, topic, expected)]


def movielens_dir() -> Path:
    """The real data: $FRESHREC_TEST_MOVIELENS, the shared copy, or fetched on first use."""
    env = os.environ.get("FRESHREC_TEST_MOVIELENS")
    try:
        if env:
            return fetch_movielens(Path(env))
        if SHARED_COPY.is_dir():
            return fetch_movielens(SHARED_COPY)
        return fetch_movielens()
    except DataError as exc:
        pytest.skip(f"MovieLens-100K unavailable: {exc}")


def test_movielens_replay_delivers_all_100k_events(settings: Settings) -> None:
    ml = load_movielens(movielens_dir())
    summary = replay(ml.events(), settings.kafka_bootstrap, settings.topic_events,
                     total=len(ml), progress=False)
    assert (summary.sent, summary.failed) == (100_000, 0)
    got = consume_all(settings, settings.topic_events, 100_000)
    assert len(got) == 100_000
    assert len({e["event_id"] for e in got}) == 100_000
    assert sum(e["label"] for e in got) == int((ml.ratings >= 4).sum())


def test_synthetic_replay_is_paced_and_keyed_by_user(settings: Settings) -> None:
    stream = SyntheticStream(SyntheticConfig(seed=1))
    summary = replay(stream.events(400), settings.kafka_bootstrap, settings.topic_events,
                     max_rate=2000, progress=False)
    assert (summary.sent, summary.failed) == (400, 0)
    assert summary.seconds >= 0.15  # 400 events at <= 2000/s
    consumer = Consumer(consumer_config(settings.kafka_bootstrap, "keys"))
    consumer.subscribe([settings.topic_events])
    seen = []
    for _ in range(40):
        seen += [m for m in consumer.consume(1000, timeout=0.5) if not m.error()]
        if len(seen) >= 400:
            break
    consumer.close()
    assert len(seen) == 400
    assert all(m.key().decode() == orjson.loads(m.value())["user_id"] for m in seen)


def test_replay_to_an_unreachable_broker_reports_failures() -> None:
    events = SyntheticStream(SyntheticConfig(seed=2)).events(10)
    summary = replay(events, f"127.0.0.1:{free_port()}", "nowhere", progress=False,
                     producer_overrides={"message.timeout.ms": 1500})
    assert summary.sent == 0 and summary.failed == 10
