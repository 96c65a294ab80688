"""The cheap cases of bench/chaos.py: kill -9 of the trainer, malformed messages of every kind,
Redis restarted empty. Real processes, a real broker and redis-server; the full counts
(20 kills, 10,000 messages, ...) run in ``python -m bench.chaos``."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import orjson
import pytest

from bench.chaos import (
    Infra,
    base_settings,
    broker_restart_case,
    live_pipeline,
    malformed_messages,
    redis_restart_case,
    trainer_kills,
    wait_for,
)
from freshrec.kafka import drain_topic
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.integration.kafka_helpers import produce, produce_events
from tests.integration.test_trainer import run_trainer, sample
from trainer.main import build_trainer

pytestmark = pytest.mark.integration


def test_trainer_killed_at_random_points_loses_no_event(tmp_path: Path) -> None:
    with Infra(tmp_path / "infra") as infra:
        out = trainer_kills(infra, tmp_path, kills=2, n_events=4000, rng=random.Random(4),
                            log=lambda _: None)
    assert out["trainer_kills"] == 2
    assert out["trainer_lost_events"] == 0
    assert out["_trainer_future_sent"] >= 1  # events dated 2096: dead-lettered, all of them
    assert out["_trainer_future_dead_lettered"] == out["_trainer_future_sent"]
    assert out["_trainer_wrongly_dead_lettered"] == 0
    assert out["_trainer_trained"] + out["_trainer_dead_lettered"] == out["_trainer_produced"]


def test_malformed_messages_of_every_kind_are_dead_lettered(settings: Settings) -> None:
    good = list(SyntheticStream(SyntheticConfig(seed=31)).events(200))
    bad = malformed_messages(45, good[0])
    produce(settings.kafka_bootstrap, settings.topic_events, [v for _, v in bad],
            [k for k, _ in bad])
    produce_events(settings.kafka_bootstrap, settings.topic_events, good)
    trainer, _ = run_trainer(settings, len(bad) + len(good))
    assert trainer.trained == len(good)
    dlq = drain_topic(settings.kafka_bootstrap, settings.topic_dlq)
    reasons = {m.key(): dict(m.headers())["reason"].decode() for m in dlq}
    assert set(reasons) == {k for k, _ in bad}
    assert all(reasons.values())
    kinds = {k.decode().rsplit("-", 1)[0] for k in reasons}
    assert len(kinds) >= 10
    assert any("ahead of wall clock" in r for r in reasons.values())
    for m in dlq:
        assert orjson.loads(m.value()) if m.key().startswith(b"bad-label") else True


def test_redis_restarted_empty_is_survived_and_caught_up(tmp_path: Path) -> None:
    with Infra(tmp_path / "infra") as infra, \
            live_pipeline(infra, tmp_path, seed=5) as (pipe, poller):
        lines: list[str] = []
        out = redis_restart_case(infra, pipe, poller, restarts=1, log=lines.append)
        assert out["redis_restarts_survived"] == 1, lines
        assert poller.monotone and poller.versions
        assert not pipe.dead()


def test_a_broker_that_lost_its_data_is_followed_from_the_start_of_its_new_log(
        tmp_path: Path) -> None:
    """The trainer's checkpoint says offset 2,000; the restarted broker's log starts over at 0.
    Everything produced after the restart is trained, none of it skipped."""
    events = list(SyntheticStream(SyntheticConfig(seed=8)).events(3000))
    with Infra(tmp_path / "infra") as infra:
        settings = base_settings(infra, "truncated", tmp_path, partitions=1)
        produce_events(settings.kafka_bootstrap, settings.topic_events, events[:2000])
        first, _ = run_trainer(settings, 2000)
        assert first.trained == 2000
        infra.kill_kafka()
        infra.start_kafka()
        metrics = TrainerMetrics()
        trainer = build_trainer(settings, metrics)
        assert trainer.offsets == {(settings.topic_events, 0): 2000}
        thread = threading.Thread(target=trainer.run, kwargs={"max_events": 3000}, daemon=True)
        thread.start()
        for start in range(2000, 3000, 200):  # a live stream: the new log keeps growing
            produce_events(settings.kafka_bootstrap, settings.topic_events,
                           events[start:start + 200])
            time.sleep(0.7)
        thread.join(60)
        assert not thread.is_alive(), f"trainer parked at {trainer.offsets}: {trainer.stats()}"
    assert trainer.trained == 3000
    assert sample(metrics, "freshrec_trainer_log_truncations_total") == 1
    assert trainer.checkpointer.latest().offsets[settings.topic_events] == {0: 1000}


def test_a_broker_restarted_empty_is_survived_by_every_process(tmp_path: Path) -> None:
    """The memory-only broker comes back without topics, offsets or producer ids: the trainer
    trains new events, the service logs new impressions and the joiner reads them, with no
    crash loop."""
    with Infra(tmp_path / "infra") as infra, \
            live_pipeline(infra, tmp_path, seed=6) as (pipe, _poller):
        wait_for(lambda: pipe.trained() > 1000, 120, "the first events to be trained")
        lines: list[str] = []
        out = broker_restart_case(infra, pipe, restarts=1, log=lines.append)
        assert out["broker_restarts_survived"] == 1, lines
        assert not pipe.dead()
