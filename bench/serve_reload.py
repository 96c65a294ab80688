"""Serving latency while full snapshots of >= 1 M rows reload: ``reload_p99_ms`` in serve.json.

    .venv/bin/python bench/serve_reload.py            # ~2 minutes
    .venv/bin/python bench/serve.py --reload          # the same phase after the rate sweep

Starts its own Redis + broker, publishes the serving benchmark's state plus 1 M extra user rows
with the real Publisher, starts ``freshrec service`` as shipped (2 SO_REUSEPORT workers) and
offers 500 req/s of 100-candidate /v1/score requests with wrk (the same driver as
``bench/serve.py``), twice in one run: once on a quiet snapshot (the baseline), once while every
replica reloads the full snapshot again and again (``SnapshotStore.announce_reload``: a full
reload of the current generation, the path a replica takes when Redis lost its data or the
update chain broke; it writes no rows, so the publisher's cost is not in the number).

Before the service starts, the same reload runs in process beside a 1 ms ticker task: the
ticker's lateness (``reload.in_process.loop_lag_*``) is how long the reload stalls the event
loop, the cause of any latency it adds, measured without HTTP or other processes.

Merges its keys into ``bench/results/serve.json`` (read-modify-write: the rate sweep's keys stay).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import redis

from bench.results_file import RESULTS, merge_into
from bench.serve import (
    LUA,
    build_state,
    request_body,
    run_wrk,
    start_service,
    start_stack,
    wait_ready,
)
from featurestore.snapshot_writer import SnapshotStore
from trainer.publisher import Publisher

EXTRA_ROWS = 1_000_000
RATE = 500
TARGET_MS = 50.0


def served_version(url: str) -> int:
    try:
        return int(httpx.get(f"{url}/v1/model", timeout=2).json()["version"] or 0)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return -1


def reload_loop(store: SnapshotStore, url: str, stop: threading.Event, log: list[dict]) -> None:
    """Announce a reload, wait until the service serves it (both workers, by sampling), repeat."""
    while not stop.is_set():
        t0 = time.perf_counter()
        version = store.announce_reload()
        seen = 0
        while not stop.is_set() and seen < 6:  # consecutive answers at the new version
            seen = seen + 1 if served_version(url) >= version else 0
            time.sleep(0.05)
        if stop.is_set():
            break
        log.append({"version": version, "served_after_s": round(time.perf_counter() - t0, 2)})


def loop_lag_during_reloads(settings, reloads: int = 2) -> dict:
    """In process: how long a replica's event loop stalls while it reloads the snapshot.

    A 1 ms ticker task runs beside :meth:`SnapshotFollower.load_full`; its lateness is what
    any request on that loop would wait. No HTTP, no other process: the reload's own cost.
    """
    import redis.asyncio as aredis

    from featurestore.schema import load_model_config
    from featurestore.snapshot_reader import AsyncSnapshotReader
    from freshrec.metrics import ServiceMetrics
    from service.snapshot import SnapshotFollower

    async def run() -> dict:
        client = aredis.Redis.from_url(settings.redis_url, socket_timeout=60)
        bulk = redis.Redis.from_url(settings.redis_url, socket_timeout=60)  # as the service
        follower = SnapshotFollower(AsyncSnapshotReader(client, settings.model_name,
                                                        bulk_client=bulk),
                                    load_model_config(settings.model_config_path),
                                    ServiceMetrics())
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t - 0.001)

        task = asyncio.create_task(ticker())
        seconds = []
        for _ in range(reloads):
            t = time.perf_counter()
            await follower.load_full()
            seconds.append(round(time.perf_counter() - t, 2))
        done.set()
        await task
        await client.aclose()
        ms = np.array(lags) * 1e3
        return {"reload_seconds": seconds, "read_from": follower.last_full_source,
                "loop_lag_max_ms": round(float(ms.max()), 1),
                "loop_lag_p99_ms": round(float(np.percentile(ms, 99)), 1),
                "loop_lag_p999_ms": round(float(np.percentile(ms, 99.9)), 1)}

    return asyncio.run(run())


def reload_phase(seconds: float = 30.0, workers: int = 2) -> dict:
    """Run the phase end to end on its own stack; returns the keys it merges into serve.json."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    stack, settings = start_stack(tmp)
    try:
        port = settings.service_port
        store = SnapshotStore(redis.Redis.from_url(stack.redis_url), settings.model_name)
        state = build_state(settings)
        rng = np.random.default_rng(3)
        extra = rng.integers(1 << 40, 1 << 62, size=EXTRA_ROWS)
        state.tables["user"].lookup(extra, 1.0)
        rows = sum(len(t) for t in state.tables.values())
        t0 = time.perf_counter()
        Publisher(store, state, settings).publish_full()
        print(f"published {rows} rows in {time.perf_counter() - t0:.1f} s")
        in_process = loop_lag_during_reloads(settings)
        print(f"in process: reload {in_process['reload_seconds']} s, event-loop lag max "
              f"{in_process['loop_lag_max_ms']} ms, p99 {in_process['loop_lag_p99_ms']} ms")
        service = start_service(stack, port, workers)
        url = f"http://127.0.0.1:{port}"
        wait_ready(stack, url, workers, timeout=300)
        body_file, lua = tmp / "body.json", tmp / "post.lua"
        body_file.write_text(json.dumps(request_body()))
        lua.write_text(LUA)
        run_wrk(f"{url}/v1/score", 200, 2, body_file, lua)  # warm-up
        quiet = run_wrk(f"{url}/v1/score", RATE, int(seconds), body_file, lua, service.pid)
        print(f"quiet:     p99 {quiet['p99_ms']:.1f} ms at {quiet['rps']:.0f} req/s")
        stop, log = threading.Event(), []
        reloader = threading.Thread(target=reload_loop, args=(store, url, stop, log))
        reloader.start()
        try:
            busy = run_wrk(f"{url}/v1/score", RATE, int(seconds), body_file, lua, service.pid)
        finally:
            stop.set()
            reloader.join(60)
        print(f"reloading: p99 {busy['p99_ms']:.1f} ms at {busy['rps']:.0f} req/s, "
              f"{len(log)} reloads of {rows} rows served, each after "
              f"{np.median([r['served_after_s'] for r in log]) if log else float('nan'):.1f} s")
        return {
            "reload_p99_ms": round(busy["p99_ms"], 2),
            "reload": {
                "rate_rps": RATE, "seconds": seconds, "workers": workers,
                "snapshot_rows": rows, "reloads_completed": len(log), "reload_log": log,
                "during_reloads": busy, "quiet": quiet, "in_process": in_process,
                "p99_ratio_to_quiet": round(busy["p99_ms"] / max(quiet["p99_ms"], 1e-9), 2),
                "target_p99_ms": TARGET_MS, "held": bool(busy["p99_ms"] <= TARGET_MS
                                                          and busy["errors"] == 0),
                "loadavg": os.getloadavg(),
            },
        }
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each wrk run")
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--name", default="serve", help="results file (bench/results/NAME.json)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    keys = reload_phase(args.seconds, args.workers)
    merge_into(RESULTS / f"{args.name}.json", keys)
    r = keys["reload"]
    print(f"reload_p99_ms {keys['reload_p99_ms']} (target <= {TARGET_MS}; quiet "
          f"{r['quiet']['p99_ms']:.1f} ms) -> {RESULTS / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
