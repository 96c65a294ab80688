"""The rows a replica serves equal the trainer's table rows after every delta, whatever its size.

A real publisher writes to a real Redis; a real service (its snapshot follower included)
follows. After each publish the replica's rows — per slot the ID set and every vector — are
compared with the trainer's tables. Deltas over ``INLINE_ID_LIMIT`` IDs travel through a
changelog key rather than the stream entry; both directions (upserts and deletions) and a
mass expiry are covered.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import redis

from featurestore.snapshot_writer import INLINE_ID_LIMIT
from freshrec.settings import Settings
from tests.service.test_service import World, build_world, poll, serve

pytestmark = pytest.mark.integration

BIG = INLINE_ID_LIMIT + 500


def served_matches_trainer(client: httpx.Client, world: World) -> None:
    """Wait for the replica to reach the publisher's version, then compare every row."""
    version = world.publisher.confirmed_version
    poll(lambda: client.get("/v1/model").json()["version"] == version, f"version {version}")
    snap = client.app.state.service.follower.snapshot  # type: ignore[attr-defined]
    assert snap.version == version
    for slot, table in world.state.tables.items():
        want_ids, want_vecs = table.all_rows()
        order = np.argsort(want_ids)
        got_ids, got_vecs = snap.slots[slot].items()
        np.testing.assert_array_equal(got_ids, want_ids[order], err_msg=slot)
        np.testing.assert_array_equal(got_vecs, want_vecs[order], err_msg=slot)


def publish(world: World, cycle: list[float]) -> None:
    cycle[0] += 1.0
    assert world.publisher.maybe_publish(time.monotonic() + cycle[0])


def last_entry_used_changelog(r: redis.Redis, world: World) -> bool:
    [(_, fields)] = r.xrevrange(world.publisher.store.keys.updates, count=1)
    return b"log" in fields


def test_served_rows_equal_the_trainers_after_big_deltas_and_a_mass_expiry(
        settings: Settings, redis_client: redis.Redis) -> None:
    world = build_world(settings)
    users = world.state.tables["user"]
    items = world.state.tables["item"]
    ttl = users.config.ttl_seconds
    rng = np.random.default_rng(7)
    cycle = [0.0]
    with serve(settings) as client:
        served_matches_trainer(client, world)

        # Upserts over the inline limit: new users, plus moved vectors of known items.
        first = rng.choice(1 << 50, size=BIG, replace=False).astype(np.int64) + 1
        users.lookup(first, 10.0)
        rows = items.find(items.all_rows()[0][:5])
        items.apply_gradients(rows, np.ones((5, items.config.dim), np.float32))
        publish(world, cycle)
        assert last_entry_used_changelog(redis_client, world)
        served_matches_trainer(client, world)

        # Upserts and deletions over the limit in one delta: new users arrive late enough in
        # event time that the sweep expires every earlier user.
        second = rng.choice(1 << 50, size=BIG, replace=False).astype(np.int64) + (1 << 51)
        users.lookup(second, 10.0 + ttl + 100.0)
        assert len(users.sweep_expired(10.0 + ttl + 50.0)) > INLINE_ID_LIMIT
        publish(world, cycle)
        assert last_entry_used_changelog(redis_client, world)
        served_matches_trainer(client, world)

        # Mass expiry: one far-future clock empties every table.
        world.state.tables.sweep_expired(1e12)
        assert all(len(t) == 0 for t in world.state.tables.values())
        publish(world, cycle)
        assert last_entry_used_changelog(redis_client, world)
        served_matches_trainer(client, world)

        # Small deltas after it (inline IDs) keep both sides equal too.
        users.lookup(np.array([11, 12]), 2e12)
        items.lookup(np.array([21, 22]), 2e12)
        publish(world, cycle)
        assert not last_entry_used_changelog(redis_client, world)
        served_matches_trainer(client, world)
