"""What the number of ID buckets costs: publishing and following a bucketed snapshot.

    .venv/bin/python -m bench.buckets --quick   # about a minute

On a local 3-master Redis Cluster (same 2 cores as this script), for B in a few bucket counts
and for the one-chain layout (B = 0), with a table of ``--rows`` live item rows:

- ``full_s``: a full snapshot (every chain written under a new generation);
- ``delta_ms``: a delta touching ``--touched`` rows (median of the repeats);
- ``poll_ms``: one follower poll of every chain's stream when nothing changed (median) — the
  fixed cost a replica pays 20 times a second;
- ``load_s``: a replica's full load of every chain;
- ``redis_bytes_per_row``: what the full snapshot added to ``used_memory`` over every master,
  per published row (hash fields, keys and chain entries together); ``redis_bytes_per_row_
  after_deltas`` the same once the deltas' chain entries are in too.

Writes ``bench/results/buckets.json``. Use it to choose ``FRESHREC_SNAPSHOT_BUCKETS``
(docs/scale.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from featurestore.schema import load_model_config
from featurestore.snapshot_buckets import AsyncBucketedReader
from featurestore.snapshot_reader import AsyncSnapshotReader
from featurestore.table import TableSet
from freshrec.metrics import ServiceMetrics
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings
from service.bucketed import BucketedFollower
from service.snapshot import SnapshotFollower
from trainer.model import CTRModel
from trainer.publisher import PublishableState, Publisher, snapshot_store

RESULTS = Path(__file__).resolve().parent / "results" / "buckets.json"


def _publisher(client: RedisCluster, buckets: int, rows: int) -> tuple[Publisher, TableSet]:
    settings = Settings(model_name=f"bench-b{buckets}", snapshot_buckets=buckets)
    config = load_model_config(settings.model_config_path)
    tables = TableSet.from_model_config(config)
    items = tables["item"]
    ids = np.arange(1, rows + 1)
    for _ in range(items.config.min_count):  # admitted after min_count sightings
        items.lookup(ids, 100.0)
    state = PublishableState(config, tables, CTRModel(config))
    return Publisher(snapshot_store(settings, client), state, settings), tables


async def _follow_cost(url: str, model: str, buckets: int, config_path: Path, polls: int
                       ) -> tuple[float, float]:
    client = AsyncRedisCluster.from_url(url, socket_timeout=30.0)
    config = load_model_config(config_path)
    follower: SnapshotFollower
    if buckets:
        reader = AsyncBucketedReader(client, model, buckets)
        follower = BucketedFollower(reader, config, ServiceMetrics())
    else:
        follower = SnapshotFollower(AsyncSnapshotReader(client, model), config, ServiceMetrics())
    started = time.perf_counter()
    assert await follower.load_full()
    load_s = time.perf_counter() - started
    times = []
    for _ in range(polls):
        started = time.perf_counter()
        if buckets:
            await reader.read_updates({c: s.position for c, s in follower.chains.items()})
        else:  # the one-chain follower's poll is one XREAD (it blocks; here it does not)
            await follower.reader.read_updates(follower.position, count=64)
        times.append(time.perf_counter() - started)
    await client.aclose()
    return load_s, statistics.median(times) * 1000


def used_memory(client: RedisCluster) -> int:
    """``used_memory`` summed over every master of the cluster."""
    info = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
    per_node = info.values() if "used_memory" not in info else [info]
    return sum(int(node["used_memory"]) for node in per_node)


def measure(cluster: LocalRedisCluster, buckets: int, rows: int, touched: int, repeats: int,
            polls: int) -> dict[str, float]:
    client = RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[0]}")
    pub, tables = _publisher(client, buckets, rows)
    empty = used_memory(client)
    started = time.perf_counter()
    pub.publish_full()
    full_s = time.perf_counter() - started
    after_full = used_memory(client)
    items = tables["item"]
    rng = np.random.default_rng(0)
    deltas = []
    clock = time.monotonic()
    for _ in range(repeats):
        sel = items.find(rng.choice(np.arange(1, rows + 1), touched, replace=False))
        items.apply_gradients(sel, rng.normal(size=(touched, items.config.dim))
                              .astype(np.float32))
        clock += 10.0
        started = time.perf_counter()
        assert pub.maybe_publish(clock)
        deltas.append(time.perf_counter() - started)
    after_deltas = used_memory(client)
    load_s, poll_ms = asyncio.run(_follow_cost(
        f"redis://127.0.0.1:{cluster.ports[0]}", pub.store.model, buckets,
        Settings().model_config_path, polls))
    client.close()
    return {"buckets": buckets, "full_s": round(full_s, 3),
            "delta_ms": round(statistics.median(deltas) * 1000, 2),
            "poll_ms": round(poll_ms, 3), "load_s": round(load_s, 3),
            "redis_bytes_per_row": round((after_full - empty) / rows, 1),
            "redis_bytes_per_row_after_deltas": round((after_deltas - empty) / rows, 1)}


def memory_per_row(cluster: LocalRedisCluster, buckets: int, rows: int) -> dict[str, float]:
    """Redis memory of one full snapshot of ``rows`` item rows, per row, over every master; at
    a size where per-key overheads are spread thin (what planning for 10^9 IDs needs)."""
    client = RedisCluster.from_url(f"redis://127.0.0.1:{cluster.ports[0]}")
    pub, _ = _publisher(client, buckets, rows)
    empty = used_memory(client)
    pub.publish_full()
    added = used_memory(client) - empty
    client.close()
    return {"buckets": buckets, "rows": rows, "redis_bytes_per_row": round(added / rows, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    args = parser.parse_args()
    rows, touched, repeats, polls = ((20_000, 2_000, 5, 30) if args.quick
                                     else (200_000, 5_000, 15, 200))
    results = []
    with LocalRedisCluster(masters=3, data_dir=Path(tempfile.mkdtemp())) as cluster:
        for b in (0, 16, 64, 256, 1024):
            results.append(measure(cluster, b, rows, touched, repeats, polls))
            r = results[-1]
            print(f"B={r['buckets']:>5}  full {r['full_s']:7.3f} s  delta {r['delta_ms']:8.2f} ms"
                  f"  poll {r['poll_ms']:7.3f} ms  load {r['load_s']:6.3f} s"
                  f"  Redis {r['redis_bytes_per_row']:6.1f} B/row", flush=True)
        memory = []
        for b in (0, 64):
            memory.append(memory_per_row(cluster, b, 1_000_000))
            print(f"B={b:>5}  {memory[-1]['redis_bytes_per_row']:6.1f} B of Redis memory per row"
                  f" (full snapshot of 1,000,000 rows)", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"quick": args.quick, "rows": rows, "touched": touched,
                                   "redis_masters": 3, "results": results,
                                   "redis_memory": memory}, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
