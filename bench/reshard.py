"""Trainer ranks publishing to a Redis Cluster while its slots move, and what a replica sees.

The scenario of ``lost_updates_during_reshard`` (``bench/scaleout.py``) and of
``tests/integration/test_rank_publishing.py``: R ranks (real processes on gloo, as torchrun
starts them) train a stream and publish their buckets' chains, rank 0 the head; a service
replica's follower (:class:`~service.bucketed.BucketedFollower` on redis-py's asyncio cluster
client) follows every chain from the start; meanwhile the head's slot and one bucket slot of
each rank move to another master key by key (:meth:`LocalRedisCluster.migrate_slot`), and
events keep arriving until the moves are done, so the ranks publish into slots mid-move.

What counts as lost, once the ranks stopped and the replica caught up (or 30 s passed):

- a row the owner rank ended with that the replica serves with another value, or not at all,
  and a row the replica serves that no owner has (``lost_rows``);
- a version a chain skipped: an entry whose ``prev_version`` is not the version of the entry
  before it on that chain (``version_gaps``); a replica reloads on those rather than apply;
- the replica's full reloads after its first load (``reloads``): each one means an update did
  not chain onto what it held;
- rank 0's final dense weights not served (``dense_equal`` false), counted as one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster
from redis.crc import key_slot

from featurestore.schema import ModelConfig, load_model_config
from featurestore.snapshot_buckets import AsyncBucketedReader, Chain
from featurestore.snapshot_keys import Keys
from freshrec.kafka import DeliveryTracker, producer_config
from freshrec.metrics import ServiceMetrics
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings
from service.bucketed import BucketedFollower
from trainer.model import model_arrays
from trainer.rank_check import RankState, load_rank_states
from trainer.sharded import Ranks

Rows = dict[str, tuple[np.ndarray, np.ndarray]]  # slot -> (ids, float32 vectors)


def rank_main(rank: int, world: int, settings: Settings, port: int, total: int,
              out: str) -> None:
    """One publishing rank (``torch.multiprocessing.spawn`` target): train until ``total``
    events are done over all ranks, publish on the way, write a summary."""
    import torch.distributed as dist

    from trainer.ranks import loopback_rank_trainer

    trainer = loopback_rank_trainer(settings, rank, world, port)
    trainer.run(max_events=total)
    publisher: Any = trainer.publisher
    summary = Path(out, f"rank-{rank}.json")
    summary.with_suffix(".tmp").write_bytes(orjson.dumps({
        "trained": trainer.trained, "steps": trainer.steps,
        "confirmed_version": publisher.confirmed_version if publisher else 0,
        "publish_errors": publisher.errors if publisher else 0}))
    summary.with_suffix(".tmp").replace(summary)  # whole, for the parent that waits on it
    dist.destroy_process_group()


# ---- what Redis holds -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainAudit:
    """One chain's update stream as Redis holds it."""

    entries: int
    writers: frozenset[str]  # the ``w`` of every entry
    gaps: int  # entries whose prev_version is not the version before them


def audit_chains(client: Any, model: str, n_buckets: int) -> dict[Chain, ChainAudit]:
    """The head and every bucket chain's stream: who wrote each entry, and version gaps."""
    out: dict[Chain, ChainAudit] = {}
    for chain in [None, *range(n_buckets)]:
        entries = client.xrange(Keys(model, chain).updates)
        gaps, prev = 0, None
        for _id, f in entries:
            if prev is not None and int(f[b"pv"]) != prev:
                gaps += 1
            prev = int(f[b"v"])
        out[chain] = ChainAudit(len(entries),
                                frozenset(f.get(b"w", b"").decode() for _, f in entries), gaps)
    return out


def foreign_writes(audits: dict[Chain, ChainAudit], world: int, n_buckets: int) -> int:
    """Chains with an entry written by a rank that does not own them (rank 0 owns the head)."""
    owners = {r: set(Ranks(r, world, n_buckets).owned_buckets()) for r in range(world)}
    bad = 0
    for chain, audit in audits.items():
        owner = 0 if chain is None else next(r for r, own in owners.items() if chain in own)
        bad += audit.writers != {f"rank-{owner}"}
    return bad


def lost_rows(served: Rows, owners: list[RankState]) -> int:
    """Rows the owners ended with that are served differently or not at all, plus rows served
    that no owner has."""
    lost = 0
    for slot in served:
        want: dict[int, np.ndarray] = {}
        for state in owners:
            ids, vecs = state.tables[slot].all_rows()
            want.update(zip(ids.tolist(), vecs, strict=True))
        ids, vecs = served[slot]
        got = dict(zip(ids.tolist(), vecs, strict=True))
        lost += sum(k not in got or not np.array_equal(got[k], v) for k, v in want.items())
        lost += sum(k not in want for k in got)
    return lost


def served_rows(follower: BucketedFollower) -> Rows:
    """Every row a replica serves, per slot."""
    assert follower.snapshot is not None
    return {slot: (sv.state.keys, sv.state.matrix[sv.state.pos])
            for slot, sv in follower.snapshot.slots.items()}


def dense_equal(follower: BucketedFollower, dense: dict[str, np.ndarray]) -> bool:
    assert follower.snapshot is not None
    got = model_arrays(follower.snapshot.model)
    return got.keys() == dense.keys() and all(np.array_equal(got[k], dense[k]) for k in got)


# ---- a replica in a thread --------------------------------------------------------------------


class FollowerThread:
    """A service replica's follower of a bucketed model on a cluster, in its own event loop."""

    def __init__(self, url: str, model: str, n_buckets: int, config: ModelConfig) -> None:
        self.follower: BucketedFollower | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, daemon=True,
                                        args=(self._main(url, model, n_buckets, config),))
        self._thread.start()
        self._ready.wait(10)

    async def _main(self, url: str, model: str, n_buckets: int, config: ModelConfig) -> None:
        client = AsyncRedisCluster.from_url(url, socket_timeout=5.0)
        self.follower = BucketedFollower(AsyncBucketedReader(client, model, n_buckets), config,
                                         ServiceMetrics(), poll_ms=10)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        try:
            await self.follower.run(until=self._stop)
        finally:
            await asyncio.wait_for(client.aclose(), 10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


# ---- the scenario -----------------------------------------------------------------------------


@dataclass
class ReshardRun:
    """What one run measured."""

    trained: int
    moved: list[tuple[int, int, int]]  # (slot, from port, to port)
    publishes_per_rank: list[int]
    lost_rows: int
    version_gaps: int
    foreign_writes: int
    reloads: int
    dense_equal: bool
    caught_up_s: float
    phases_s: dict[str, float]  # ranks up and published, slots moved, ranks done
    rows_served: int
    masters_with_buckets: int
    audits: dict[Chain, ChainAudit] = field(repr=False, default_factory=dict)

    @property
    def lost_updates(self) -> int:
        return self.lost_rows + self.version_gaps + self.reloads + (not self.dense_equal)


def _moving_slots(model: str, world: int, n_buckets: int) -> list[int]:
    """The head's slot and the slot of each rank's first bucket."""
    return [key_slot(Keys(model).meta.encode())] + [
        key_slot(Keys(model, Ranks(r, world, n_buckets).owned_buckets()[0]).meta.encode())
        for r in range(world)]


def publish_while_resharding(settings: Settings, cluster: LocalRedisCluster,
                             events: list[dict], out: Path, *, world: int = 2,
                             pause_s: float = 0.05, chunk: int = 100,
                             timeout_s: float = 180.0) -> ReshardRun:
    """Run the scenario of this module; ``settings`` point at ``cluster`` with buckets."""
    import torch.multiprocessing as mp

    from freshrec.devstack import free_port

    model, buckets = settings.model_name, settings.snapshot_buckets
    config = load_model_config(settings.model_config_path)
    client = RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[0]}")
    replica = FollowerThread(f"redis://127.0.0.1:{cluster.ports[0]}", model, buckets, config)
    ctx = mp.spawn(rank_main, args=(world, settings, free_port(), len(events), str(out)),
                   nprocs=world, join=False)
    moved: list[tuple[int, int, int]] = []
    phases, t0 = {}, time.monotonic()
    try:
        deadline = time.monotonic() + timeout_s
        while not client.exists(Keys(model).meta):  # the ranks are up and published in full
            if time.monotonic() > deadline or any(not p.is_alive() for p in ctx.processes):
                raise RuntimeError("the ranks did not publish a first snapshot")
            time.sleep(0.05)

        def move() -> None:
            for slot in _moving_slots(model, world, buckets):
                moved.append((slot, *cluster.migrate_slot(slot, pause_s=pause_s)))

        phases["ranks_published"] = time.monotonic() - t0
        mover = threading.Thread(target=move)
        mover.start()
        _produce_while(settings, events, chunk, mover)
        mover.join()
        phases["slots_moved"] = time.monotonic() - t0
        # Each rank writes its summary after its final checkpoint and publish; the processes
        # may take seconds more to exit (gloo, torch), which the analysis does not wait for.
        while not all((out / f"rank-{r}.json").exists() for r in range(world)):
            if time.monotonic() > deadline or any(p.exitcode for p in ctx.processes):
                raise RuntimeError(f"the ranks did not finish {len(events)} events")
            time.sleep(0.1)
        phases["ranks_done"] = time.monotonic() - t0
    except BaseException:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        replica.stop()
        raise
    summaries = [orjson.loads((out / f"rank-{r}.json").read_bytes()) for r in range(world)]
    owners = load_rank_states(settings.trainer_checkpoint_dir, world, config)
    started = time.monotonic()
    follower = replica.follower
    assert follower is not None
    # The ranks stopped publishing: the replica has caught up when it applied every chain's
    # last entry (compared as versions, cheap; the rows are compared once, below).
    final = {c: int(e[0][1][b"v"]) for c in [None, *range(buckets)]
             if (e := client.xrevrange(Keys(model, c).updates, count=1))}
    while time.monotonic() - started < 60.0:
        chains = dict(follower.chains)
        if final and all(c in chains and chains[c].version >= v for c, v in final.items()):
            break
        time.sleep(0.05)
    caught_up = time.monotonic() - started
    replica.stop()
    audits = audit_chains(client, model, buckets)
    served = served_rows(follower)
    run = ReshardRun(
        trained=sum(s["trained"] for s in summaries), moved=moved,
        publishes_per_rank=[s["confirmed_version"] for s in summaries],
        lost_rows=lost_rows(served, owners),
        version_gaps=sum(a.gaps for a in audits.values()),
        foreign_writes=foreign_writes(audits, world, buckets),
        reloads=follower.full_loads - 1, dense_equal=dense_equal(follower, owners[0].dense),
        caught_up_s=round(caught_up, 2),
        phases_s={k: round(v, 2) for k, v in phases.items()},
        rows_served=sum(len(i) for i, _ in served.values()),
        masters_with_buckets=cluster.masters_holding(f"fr:{{{model}:b*"), audits=audits)
    client.close()
    for p in ctx.processes:
        p.join(30)
        if p.is_alive():
            p.kill()
    return run


def scaleout_keys(stack: Any, total: int, work: Path, world: int = 2) -> dict[str, Any]:
    """The Redis-side keys of ``bench/scaleout.py``: ``world`` ranks publishing ``total``
    synthetic events as shipped (64 buckets, default publish intervals) to a local 3-master
    cluster while three slots move."""
    from freshrec.cli import CLUSTER_SNAPSHOT_BUCKETS
    from freshrec.kafka import create_topics
    from freshrec.synthetic import SyntheticConfig, SyntheticStream

    topic = f"bench-reshard-{int(time.time())}"
    create_topics(stack.kafka_bootstrap, [topic, topic + ".dlq"], world)
    events = list(SyntheticStream(SyntheticConfig(seed=4)).events(total))
    with LocalRedisCluster(3, data_dir=work / "redis-cluster") as cluster:
        settings = Settings(
            kafka_bootstrap=stack.kafka_bootstrap, redis_url=cluster.url, topic_events=topic,
            topic_dlq=topic + ".dlq", topic_partitions=world, trainer_metrics_port=0,
            trainer_group_id=topic, trainer_checkpoint_dir=work / "reshard",
            model_name=topic, snapshot_buckets=CLUSTER_SNAPSHOT_BUCKETS)
        out = work / "reshard-ranks"
        out.mkdir()
        run = publish_while_resharding(settings, cluster, events, out, world=world,
                                       chunk=max(total // 40, 1))
        masters = len(cluster.ports)
    return {
        "redis_masters": masters,
        "served_buckets_on_masters": run.masters_with_buckets,
        "lost_updates_during_reshard": run.lost_updates,
        "reshard": {
            "events": run.trained, "buckets": CLUSTER_SNAPSHOT_BUCKETS,
            "moved_slots": [f"{slot}: {src} -> {dst}" for slot, src, dst in run.moved],
            "publishes_per_rank": run.publishes_per_rank, "lost_rows": run.lost_rows,
            "version_gaps": run.version_gaps, "replica_reloads": run.reloads,
            "foreign_writes": run.foreign_writes, "dense_equal": run.dense_equal,
            "rows_served": run.rows_served, "replica_caught_up_s": run.caught_up_s,
            "phases_s": run.phases_s},
    }


def _produce_while(settings: Settings, events: list[dict], chunk: int,
                   mover: threading.Thread) -> None:
    """Produce ``events`` keyed by user, ``chunk`` every 0.1 s, holding the last chunk until
    ``mover`` is done: the ranks train and publish during the whole move."""
    producer = Producer(producer_config(settings.kafka_bootstrap))
    tracker = DeliveryTracker()
    last = max(len(events) - chunk, 0)
    for start in range(0, len(events), chunk):
        if start >= last:
            mover.join()
        for e in events[start:start + chunk]:
            producer.produce(settings.topic_events, orjson.dumps(e),
                             key=str(e["user_id"]).encode(), on_delivery=tracker)
        producer.flush(10)
        time.sleep(0.1)
    if producer.flush(30) or tracker.delivered != len(events):
        raise RuntimeError(f"produced {tracker.delivered} of {len(events)} events")


__all__ = [
    "ChainAudit", "FollowerThread", "ReshardRun", "audit_chains", "foreign_writes", "lost_rows",
    "publish_while_resharding", "rank_main", "scaleout_keys", "served_rows",
]  # fmt: skip
