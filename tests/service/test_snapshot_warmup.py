"""A serving process' work on its first snapshot: one scored request and a heap freeze before
it reports ready, and why freezing cannot leak replaced snapshots."""

from __future__ import annotations

import gc
import weakref

import pytest
import redis

from featurestore.schema import load_model_config
from featurestore.snapshot_reader import SnapshotReader
from freshrec.settings import Settings
from service.main import _warm_up_and_freeze
from service.snapshot import ServingSnapshot
from service.state import ServiceState
from tests.service.test_service import body, build_world, poll, serve, served


def test_ready_only_after_the_hook_ran_on_the_first_snapshot(settings: Settings) -> None:
    seen: list[tuple[int, int]] = []

    def hook(state: ServiceState) -> None:
        seen.append((state.snapshot.version, gc.get_freeze_count()))
        _warm_up_and_freeze(state)

    try:
        with serve(settings, wait_ready=False, when_loaded=hook) as client:
            r = client.get("/readyz")
            assert r.status_code == 503 and r.json()["status"] == "waiting for a snapshot"
            assert seen == []
            world = build_world(settings)
            poll(lambda: client.get("/readyz").status_code == 200, "ready after the hook")
            assert len(seen) == 1
            version, frozen_before = seen[0]
            assert version == client.get("/readyz").json()["version"]
            # the lifespan's and the first scoring's objects left the collected generations
            assert gc.get_freeze_count() > frozen_before
            # and requests are answered as before it
            pctr, _ = world.reference(0, [1])
            assert served(client.post("/v1/score", json=body(0, [1])))["m1"]["pctr"] == (
                pytest.approx(pctr[0], rel=1e-5))
    finally:
        gc.unfreeze()  # this test process builds many apps: keep them collectable


def test_a_replaced_snapshot_is_freed_by_reference_counting_alone(settings: Settings) -> None:
    """A frozen object is never collected as part of a cycle; a snapshot has none, so the one
    frozen with the heap is freed like any other when a reload replaces it."""
    build_world(settings)
    config = load_model_config(settings.model_config_path)
    full = SnapshotReader(redis.Redis.from_url(settings.redis_url), settings.model_name).read_full()
    snap = ServingSnapshot.from_full(full, config)
    parts = [snap, snap.dense, snap.model, snap.bandit, *snap.slots.values()]
    refs = [weakref.ref(p) for p in parts if p is not None]
    gc.disable()  # only reference counting may free them now
    try:
        del snap, parts, full
        assert [r() for r in refs] == [None] * len(refs)
    finally:
        gc.enable()
