"""The cheap cases of bench/chaos.py: kill -9 of the trainer, malformed messages of every kind,
Redis restarted empty. Real processes, a real broker and redis-server; the full counts
(20 kills, 10,000 messages, ...) run in ``python -m bench.chaos``."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from bench.chaos import (
    Infra,
    live_pipeline,
    malformed_messages,
    redis_restart_case,
    trainer_kills,
)
from freshrec.kafka import drain_topic
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.integration.kafka_helpers import produce, produce_events
from tests.integration.test_trainer import run_trainer

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
        out = redis_restart_case(infra, pipe, poller, restarts=1, log=lambda _: None)
        assert out["redis_restarts_survived"] == 1
        assert poller.monotone and poller.versions
        assert not pipe.dead()
