"""The background publisher against a real redis-server that goes away and comes back.

Training-side calls must return while Redis is frozen or down; what was trained meanwhile is
merged and reaches Redis once it answers — as one merged delta when Redis kept its data, as a
full snapshot when it came back empty or the merged delta outgrew its bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from featurestore.schema import load_model_config
from featurestore.snapshot_writer import SnapshotStore
from featurestore.table import TableSet
from freshrec.devstack import free_port, redis_server_binary, wait_for_redis
from freshrec.settings import Settings
from trainer.model import CTRModel
from trainer.publisher import PublishableState, Publisher

pytestmark = pytest.mark.integration


class RedisProcess:
    """A redis-server of this test's own, to stop, freeze and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(redis_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for_redis(self.url)

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_proc() -> Iterator[RedisProcess]:
    r = RedisProcess()
    r.start()
    yield r
    r.stop()


def make_publisher(url: str, **overrides: object) -> tuple[Publisher, PublishableState]:
    settings = Settings(model_name="outage", **overrides)
    config = load_model_config(settings.model_config_path)
    tables = TableSet.from_model_config(config)
    tables["item"].lookup(np.arange(1, 101), 1.0)
    tables["user"].lookup(np.arange(1, 51), 1.0)
    state = PublishableState(config, tables, CTRModel(config))
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return Publisher(SnapshotStore(client, "outage"), state, settings, background=True), state


def train_a_little(state: PublishableState, rng: np.random.Generator, ts: float) -> None:
    items = state.tables["item"]
    items.lookup(rng.integers(1, 10_000, size=20), ts)
    rows = items.find(items.all_rows()[0][:10])
    items.apply_gradients(rows, rng.normal(size=(10, items.config.dim)).astype(np.float32))
    state.tables["user"].sweep_expired(ts - 50.0)  # deletions too


def redis_equals_tables(url: str, state: PublishableState, version: int) -> bool:
    store = SnapshotStore(redis.Redis.from_url(url), "outage")
    full = store.read_full()
    if full is None or full.meta.version != version:
        return False
    for slot, table in state.tables.items():
        ids, vecs = table.all_rows()
        o = np.argsort(ids)
        got_ids, got_vecs = full.emb[slot]
        if not (np.array_equal(got_ids, ids[o]) and np.array_equal(got_vecs, vecs[o])):
            return False
    return True


def sample(pub: Publisher, name: str) -> float:
    return pub.metrics.registry.get_sample_value(f"freshrec_trainer_{name}") or 0.0


def settle(pub: Publisher, url: str, state: PublishableState, cycle: list[float]) -> None:
    """Keep cycling until Redis holds exactly the tables (the publisher thread caught up)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        cycle[0] += 1.0
        pub.maybe_publish(cycle[0])
        time.sleep(0.2)
        if pub.confirmed_version and redis_equals_tables(url, state, pub.confirmed_version):
            return
    raise AssertionError("Redis never caught up with the tables")


def train_and_publish(pub: Publisher, state: PublishableState, rng: np.random.Generator,
                      cycle: list[float], ts: float, pause_s: float = 0.0) -> None:
    """One training step at event time ``ts``, then the next publish cycle."""
    train_a_little(state, rng, ts)
    cycle[0] += 1.0
    pub.maybe_publish(cycle[0])
    time.sleep(pause_s)


def test_a_frozen_redis_gets_the_merged_delta_when_it_thaws(redis_proc: RedisProcess) -> None:
    pub, state = make_publisher(redis_proc.url)
    rng = np.random.default_rng(1)
    cycle = [time.monotonic()]
    try:
        settle(pub, redis_proc.url, state, cycle)
        generation = pub.generation
        os.kill(redis_proc.proc.pid, signal.SIGSTOP)
        for k in range(12):
            train_and_publish(pub, state, rng, cycle, 100.0 + k, pause_s=0.1)
        assert sample(pub, "publish_failures_total") > 0
        assert sample(pub, "publish_merged_deltas_total") > 0
        os.kill(redis_proc.proc.pid, signal.SIGCONT)
        settle(pub, redis_proc.url, state, cycle)
        assert pub.generation == generation  # a merged delta, not a full snapshot
    finally:
        pub.close(timeout_s=2)


def test_past_the_bound_redis_gets_a_full_snapshot_once_back(redis_proc: RedisProcess) -> None:
    pub, state = make_publisher(redis_proc.url, trainer_publish_max_pending_rows=30)
    rng = np.random.default_rng(2)
    cycle = [time.monotonic()]
    try:
        settle(pub, redis_proc.url, state, cycle)
        generation = pub.generation
        redis_proc.stop()
        for k in range(10):
            train_and_publish(pub, state, rng, cycle, 200.0 + k, pause_s=0.05)
        assert sample(pub, "publish_overflows_total") >= 1
        redis_proc.start()  # empty, on the same port
        settle(pub, redis_proc.url, state, cycle)
        assert pub.generation != generation
    finally:
        pub.close(timeout_s=2)


def test_images_written_between_deltas_read_back_as_the_tables(redis_proc: RedisProcess) -> None:
    """Every image holds exactly the version it names: image + later entries == the tables."""
    pub, state = make_publisher(redis_proc.url, trainer_snapshot_image_interval_s=3.0)
    rng = np.random.default_rng(3)
    cycle = [time.monotonic()]
    try:
        settle(pub, redis_proc.url, state, cycle)
        for k in range(20):
            train_and_publish(pub, state, rng, cycle, 300.0 + k)
            if k % 7 == 6:
                settle(pub, redis_proc.url, state, cycle)
        settle(pub, redis_proc.url, state, cycle)
        images = pub.metrics.registry.get_sample_value("freshrec_trainer_publishes_total",
                                                       {"kind": "image"})
        assert images is not None and images >= 5  # the full snapshot's + every ~3 cycles
        full = SnapshotStore(redis.Redis.from_url(redis_proc.url), "outage").read_full()
        assert full is not None and full.source == "image" and full.meta.image.version > 1
    finally:
        pub.close(timeout_s=2)
