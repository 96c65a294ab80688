"""Shared fixtures: one real broker and one real Redis per test session, on free loopback ports.

Integration tests isolate themselves by topic names, consumer groups and Redis model names
derived from the test's name, so they can share the servers without seeing each other's data.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from freshrec.devstack import LocalStack
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings, to_environ


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A Tansu broker and a redis-server for the whole session, torn down at the end."""
    local = LocalStack(log_dir=tmp_path_factory.mktemp("stack-logs"))
    local.start()
    yield local
    local.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """A real 3-master Redis Cluster (about 3 s to start), shared by the session."""
    cluster = LocalRedisCluster(masters=3, data_dir=tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@dataclass(frozen=True)
class Names:
    """Topic, group and model names unique to one test."""

    prefix: str

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def impressions(self) -> str:
        return f"{self.prefix}.impressions"

    @property
    def clicks(self) -> str:
        return f"{self.prefix}.clicks"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.events.dlq"

    @property
    def topics(self) -> list[str]:
        return [self.events, self.impressions, self.clicks, self.dlq]


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Names:
    """Names derived from the test name plus a random suffix."""
    base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40]
    return Names(f"t-{base}-{uuid.uuid4().hex[:6]}")


@pytest.fixture
def settings(stack: LocalStack, names: Names, tmp_path) -> Settings:
    """Settings pointed at the session stack and this test's own topics, group and model."""
    return make_settings(stack, names, tmp_path)


def make_settings(stack: LocalStack, names: Names, tmp_path: Path) -> Settings:
    """Settings of their own topics (created here), groups, model and directories."""
    from freshrec.kafka import create_topics

    create_topics(stack.kafka_bootstrap, names.topics, partitions=2)
    return Settings(
        kafka_bootstrap=stack.kafka_bootstrap,
        redis_url=stack.redis_url,
        topic_events=names.events,
        topic_impressions=names.impressions,
        topic_clicks=names.clicks,
        topic_dlq=names.dlq,
        topic_partitions=2,
        model_name=names.prefix,
        trainer_group_id=f"{names.prefix}-trainer",
        trainer_checkpoint_dir=tmp_path / "checkpoints",
        trainer_metrics_port=0,
        joiner_group_id=f"{names.prefix}-joiner",
        joiner_checkpoint_dir=tmp_path / "joiner-checkpoints",
        joiner_metrics_port=0,
        joiner_window_s=5.0,
        joiner_lateness_s=0.5,
        data_dir=tmp_path,
    )


@pytest.fixture
def redis_client(stack: LocalStack) -> redis.Redis:
    """A client of the session Redis."""
    return redis.Redis.from_url(stack.redis_url)


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """Environment for a freshrec subprocess configured exactly like ``settings``."""
    return to_environ(settings, **overrides)
