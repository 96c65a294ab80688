"""Trainer ranks publishing to a real 3-master Redis Cluster while slots move.

Once per module (``bench/reshard.py``, the scenario ``bench/scaleout.py`` measures): 2 ranks
(real processes on gloo) train 3,000 events and publish their buckets' chains, rank 0 the
head; a service replica's follower follows from the start; the head's slot and one bucket slot
of each rank move to another master key by key while events keep arriving. Then: who wrote
each chain, whether the replica ends with exactly the owners' rows and rank 0's dense weights,
and whether the service scores from that cluster exactly as from one Redis holding the same
snapshot.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from redis.cluster import RedisCluster

from bench.reshard import ReshardRun, publish_while_resharding
from featurestore.snapshot_buckets import BucketedReader
from featurestore.snapshot_keys import Keys
from featurestore.snapshot_types import SnapshotData
from featurestore.snapshot_writer import SnapshotStore
from freshrec.devstack import LocalStack
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.conftest import Names, make_settings
from tests.service.test_service import serve

pytestmark = pytest.mark.integration

WORLD = 2
BUCKETS = 8
EVENTS = 3000


@pytest.fixture(scope="module")
def published(stack: LocalStack, redis_cluster: LocalRedisCluster,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, ReshardRun,
                                                                            list[dict]]]:
    tmp = tmp_path_factory.mktemp("rank-publishing")
    settings = make_settings(stack, Names(f"t-rankpub-{uuid.uuid4().hex[:6]}"), tmp)
    settings = settings.model_copy(update={"redis_url": redis_cluster.url,
                                           "snapshot_buckets": BUCKETS})
    events = list(SyntheticStream(SyntheticConfig(seed=23, n_users=500, n_items=300))
                  .events(EVENTS))
    run = publish_while_resharding(settings, redis_cluster, events, tmp, world=WORLD)
    yield settings, run, events
    client = RedisCluster.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    for key in client.scan_iter(match=f"fr:{{{settings.model_name}*"):
        client.delete(key)
    client.close()


def test_every_published_chain_was_written_by_its_owner_rank(published) -> None:
    settings, run, _ = published
    assert run.trained == EVENTS
    # Rank 0 wrote every entry of the head, rank k % 2 every entry of bucket k.
    assert run.foreign_writes == 0, {c: a.writers for c, a in run.audits.items()}
    assert all(a.entries > 1 for a in run.audits.values())  # a full snapshot, then deltas
    client = RedisCluster.from_url(settings.redis_url.rsplit("/", 1)[0])
    for chain in [None, *range(BUCKETS)]:
        owner = 0 if chain is None else chain % WORLD
        assert client.hget(Keys(settings.model_name, chain).meta, "writer") == (
            f"rank-{owner}".encode())
    client.close()
    # The model spreads over every master of the cluster.
    assert run.masters_with_buckets == 3


def test_a_live_slot_migration_while_ranks_publish_loses_no_update(published) -> None:
    _, run, _ = published
    assert len(run.moved) == 3 and all(src != dst for _, src, dst in run.moved)
    assert all(n > 2 for n in run.publishes_per_rank)  # both ranks kept publishing
    # Every chain's versions follow on from each other, the replica never had to reload, and
    # it serves exactly the owners' final rows and rank 0's final dense weights.
    assert run.version_gaps == 0
    assert run.reloads == 0
    assert run.lost_rows == 0 and run.rows_served > 0
    assert run.dense_equal


def test_the_service_scores_a_cluster_snapshot_as_from_one_redis(
        published, stack: LocalStack) -> None:
    """The same snapshot served from the cluster (bucketed, written by the ranks) and from one
    Redis (one chain, copied from the cluster): the same scores, to the bit."""
    settings, _, events = published
    cluster = RedisCluster.from_url(settings.redis_url.rsplit("/", 1)[0])
    full = BucketedReader(cluster, settings.model_name, BUCKETS).read_full()
    cluster.close()
    assert full is not None
    merged = full.merged()
    single = settings.model_copy(update={"redis_url": stack.redis_url, "snapshot_buckets": 0,
                                         "model_name": settings.model_name + "-one"})
    store = SnapshotStore(redis.Redis.from_url(stack.redis_url), single.model_name)
    store.write_full(SnapshotData(emb=merged.emb, dense=merged.dense),
                     version=merged.meta.version, prev_version=0,
                     schema_hash=merged.meta.schema_hash, slots=merged.meta.slots)
    requests = [_request(events, i) for i in range(0, 600, 100)]
    with serve(settings) as from_cluster, serve(single) as from_one:
        for body in requests:
            a = _scores(from_cluster, body)
            b = _scores(from_one, body)
            assert a == b
            assert len(set(a.values())) > 1  # trained rows: the items score differently
    store.drop()


_USER_FEATURES = ("age", "gender", "occupation", "zip_prefix")


def _request(events: list[dict], at: int) -> dict:
    """A scoring request for the user of event ``at`` over the next 20 events' items."""
    user = events[at]
    items = {e["item_id"]: e for e in events[at:at + 20]}
    return {"user_id": user["user_id"], "explore": False, "top_k": len(items),
            "features": {k: v for k, v in user["features"].items() if k in _USER_FEATURES},
            "candidates": [{"item_id": i, "features": {
                k: v for k, v in e["features"].items() if k not in _USER_FEATURES}}
                for i, e in items.items()]}


def _scores(client: httpx.Client, body: dict) -> dict[str, float]:
    resp = client.post("/v1/score", json=body)
    assert resp.status_code == 200, resp.text
    return {it["item_id"]: it["pctr"] for it in resp.json()["items"]}


