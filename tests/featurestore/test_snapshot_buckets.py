"""The bucketed snapshot layout on a real 3-master Redis Cluster (and on one Redis).

A publisher writes the chains, a service follower reads them; both must end up holding exactly
the trainer's tables and dense weights — through deletions, through a live slot migration
(``CLUSTER SETSLOT`` + ``MIGRATE`` while publishing), and with a single Redis as the one-node
case.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import redis
import torch
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from featurestore.schema import load_model_config
from featurestore.snapshot_buckets import (
    AsyncBucketedReader,
    BucketedReader,
    BucketedStore,
    split_by_bucket,
)
from featurestore.snapshot_keys import Keys, bucket_of
from featurestore.snapshot_types import SnapshotData
from featurestore.table import TableSet
from freshrec.metrics import ServiceMetrics
from freshrec.redis_client import RedisModeError, is_cluster
from freshrec.redis_client import redis_client as redis_client_for
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings
from service.bucketed import BucketedFollower
from trainer.model import CTRModel, model_arrays
from trainer.publisher import PublishableState, Publisher

BUCKETS = 16

# ---- pure logic -------------------------------------------------------------------------------


def _splitmix_finalizer(x: int) -> int:
    m = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_bucket_of_is_splitmix_modulo_and_spreads_sequential_ids() -> None:
    ids = np.arange(1, 100_001, dtype=np.int64)
    got = bucket_of(ids, 64)
    assert [int(b) for b in got[:50]] == [_splitmix_finalizer(int(i)) % 64 for i in ids[:50]]
    counts = np.bincount(got, minlength=64)
    assert counts.min() > 0.9 * len(ids) / 64 and counts.max() < 1.1 * len(ids) / 64
    negative = np.array([-1, -(2**63)], dtype=np.int64)  # hashed string IDs are any int64
    assert ((bucket_of(negative, 64) >= 0) & (bucket_of(negative, 64) < 64)).all()


def test_split_by_bucket_puts_every_row_and_deletion_in_its_bucket() -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(-(2**62), 2**62, size=500)
    data = SnapshotData(emb={"item": (ids, rng.normal(size=(500, 4)).astype(np.float32))},
                        deleted={"item": ids[:50] + 1})
    parts = split_by_bucket(data, BUCKETS)
    back = np.concatenate([p.emb["item"][0] for p in parts.values() if "item" in p.emb])
    assert np.array_equal(np.sort(back), np.sort(ids))
    for k, part in parts.items():
        for got in (part.emb.get("item", (ids[:0],))[0], part.deleted.get("item", ids[:0])):
            assert (bucket_of(got, BUCKETS) == k).all()
        if "item" in part.emb:
            sel = np.isin(ids, part.emb["item"][0])
            assert np.array_equal(part.emb["item"][1], data.emb["item"][1][sel])


# ---- against real servers ----------------------------------------------------------------------


class World:
    """A trainer's publishable state and a publisher writing it in buckets."""

    def __init__(self, client: redis.Redis | RedisCluster, model: str) -> None:
        self.settings = Settings(model_name=model, snapshot_buckets=BUCKETS,
                                 trainer_dense_publish_interval_s=0.05)
        config = load_model_config(self.settings.model_config_path)
        self.tables = TableSet.from_model_config(config)
        torch.manual_seed(0)
        self.state = PublishableState(config, self.tables, CTRModel(config))
        self.store = BucketedStore(client, model, n_buckets=BUCKETS)
        self.publisher = Publisher(self.store, self.state, self.settings)
        self.rng = np.random.default_rng(7)
        self.clock = 1000.0
        self.ts = 100.0

    def train_a_little(self) -> None:
        items = self.tables["item"]
        self.ts += 1.0
        items.lookup(self.rng.integers(1, 5_000, size=40), self.ts)
        self.tables["user"].lookup(self.rng.integers(1, 500, size=10), self.ts)
        rows = items.find(items.all_rows()[0][:20])
        items.apply_gradients(rows, self.rng.normal(size=(20, items.config.dim))
                              .astype(np.float32))
        self.tables["user"].sweep_expired(self.ts - 5.0)  # deletions too
        with torch.no_grad():
            next(self.state.model.parameters()).add_(0.01)

    def publish(self) -> bool:
        self.clock = max(self.clock, time.monotonic()) + 1.0  # past every publish interval
        return self.publisher.maybe_publish(self.clock)


def matches_tables(full_emb: dict[str, tuple[np.ndarray, np.ndarray]], world: World) -> bool:
    for slot, table in world.tables.items():
        ids, vecs = table.all_rows()
        o = np.argsort(ids)
        got_ids, got_vecs = full_emb[slot]
        g = np.argsort(got_ids)
        if not (np.array_equal(got_ids[g], ids[o]) and np.array_equal(got_vecs[g], vecs[o])):
            return False
    return True


def served_rows(follower: BucketedFollower) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    assert follower.snapshot is not None
    out = {}
    for slot, sv in follower.snapshot.slots.items():
        st = sv.state
        out[slot] = (st.keys, st.matrix[st.pos])
    return out


def dense_equal(follower: BucketedFollower, world: World) -> bool:
    assert follower.snapshot is not None
    want = model_arrays(world.state.model)
    got = model_arrays(follower.snapshot.model)
    return all(np.array_equal(want[k], got[k]) for k in want)


@pytest.mark.integration
def test_a_bucketed_model_spreads_over_every_master(redis_cluster: LocalRedisCluster) -> None:
    client = RedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    world = World(client, "spread")
    assert is_cluster(redis_cluster.url)
    world.train_a_little()
    world.publisher.publish_full()
    for _ in range(5):
        world.train_a_little()
        assert world.publish()
    full = BucketedReader(client, "spread", BUCKETS).read_full()
    assert full is not None and matches_tables(full.merged().emb, world)
    assert full.merged().source == "image"  # every chain's image plus its entries since
    # Every chain is one slot, and the chains land on every master.
    slots = {key_slot(Keys("spread", k).meta.encode()) for k in range(BUCKETS)}
    assert len(slots) == BUCKETS
    holders = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
    assert all(n > 0 for n in holders), holders
    # A chain's rows are exactly its bucket's IDs.
    for k, part in full.buckets.items():
        for ids, _ in part.emb.values():
            assert (bucket_of(ids, BUCKETS) == k).all()


@pytest.mark.integration
def test_a_single_redis_is_the_one_node_case(redis_client: redis.Redis) -> None:
    world = World(redis_client, f"onenode-{time.monotonic_ns()}")
    world.train_a_little()
    world.publisher.publish_full()
    for _ in range(3):
        world.train_a_little()
        world.publish()
    full = BucketedReader(redis_client, world.settings.model_name, BUCKETS).read_full()
    assert full is not None and matches_tables(full.merged().emb, world)
    world.store.drop()


@pytest.mark.integration
def test_a_live_slot_migration_loses_no_update(redis_cluster: LocalRedisCluster) -> None:
    model = "migrate"
    client = RedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    world = World(client, model)
    world.train_a_little()
    world.publisher.publish_full()
    moved: list[tuple[int, int, int]] = []
    publishes: list[tuple[float, float]] = []  # (start, end) of each publish while moving
    moving: list[float] = []  # start and end of the moves
    publishing = threading.Event()
    # The head chain (dense weights) and two bucket chains move while publishing goes on.
    slots = [key_slot(Keys(model).meta.encode())] + [
        key_slot(Keys(model, k).meta.encode()) for k in (3, 11)]

    def migrate() -> None:
        publishing.wait(30)  # the moves start once publishing runs
        moving.append(time.monotonic())
        for slot in slots:
            moved.append((slot, *redis_cluster.migrate_slot(slot, pause_s=0.15)))
        moving.append(time.monotonic())

    async def run() -> BucketedFollower:
        aclient = AsyncRedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}",
                                             socket_timeout=5.0)
        follower = BucketedFollower(AsyncBucketedReader(aclient, model, BUCKETS),
                                    world.state.config, ServiceMetrics(), poll_ms=10)
        assert await follower.load_full()
        stop = asyncio.Event()
        task = asyncio.create_task(follower.run(until=stop))
        mover = threading.Thread(target=migrate)
        mover.start()


        def train_while_moving() -> None:  # the trainer's side, while the follower follows
            while mover.is_alive():
                world.train_a_little()
                start = time.monotonic()
                publishing.set()
                if world.publish():
                    publishes.append((start, time.monotonic()))
                time.sleep(0.01)

        await asyncio.to_thread(train_while_moving)
        mover.join()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the publisher retries what the moves refused
            world.publish()
            await asyncio.sleep(0.05)
            if (world.publisher._delta is None and follower.snapshot is not None
                    and matches_tables(served_rows(follower), world)
                    and dense_equal(follower, world)):
                break
        stop.set()
        await asyncio.wait_for(task, 10)
        await asyncio.wait_for(aclient.aclose(), 10)
        return follower

    follower = asyncio.run(run())
    assert len(moved) == 3 and all(src != dst for _, src, dst in moved)
    # The moves ran during publishing: some publish overlapped them (a write to a slot mid-move
    # waits in redis-py's retries, TRYAGAIN / ASK, until the slot settled, so one publish can
    # span every move on a slow machine).
    assert any(start < moving[1] and end > moving[0] for start, end in publishes), \
        (publishes, moving)
    for slot, _, dst in moved:  # the slots really moved
        owner = redis.Redis(port=dst).execute_command("CLUSTER COUNTKEYSINSLOT", slot)
        assert owner > 0
    full = BucketedReader(client, model, BUCKETS).read_full()
    assert full is not None and matches_tables(full.merged().emb, world)
    assert matches_tables(served_rows(follower), world)
    assert dense_equal(follower, world)


@pytest.mark.integration
def test_the_redis_cluster_setting_is_checked_against_the_server(
        redis_cluster: LocalRedisCluster, redis_client: redis.Redis) -> None:
    """Forced either way, the setting must match what the server says it is; unset, the
    server decides."""
    single_url = redis_client.connection_pool.connection_kwargs
    single = f"redis://127.0.0.1:{single_url['port']}/0"
    for url, wrong, right, kind in ((redis_cluster.url, False, True, RedisCluster),
                                    (single, True, False, redis.Redis)):
        with pytest.raises(RedisModeError, match="FRESHREC_REDIS_CLUSTER"):
            redis_client_for(Settings(redis_url=url, redis_cluster=wrong))
        for setting in (right, None):
            client = redis_client_for(Settings(redis_url=url, redis_cluster=setting))
            assert type(client) is kind and client.ping()
            client.close()
