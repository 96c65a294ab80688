"""Thread budget and shared metrics, A/B in one run: service CPU per request at a fixed rate.

    .venv/bin/python bench/serve_budget.py   # ~4 minutes

Same harness, snapshot and request as bench/serve.py; each variant is a fresh ``freshrec
service`` driven by wrk at a fixed offered rate, and the variants alternate over rounds so that
machine load hits them alike (the VM is shared: compare the ratios, not the absolute numbers):

* ``shipped``: 2 workers, budget from the machine (1 thread per pool and worker on 2 cores);
* ``unsized``: 2 workers with 2 threads per pool each (``FRESHREC_CPU_THREADS=4``), what the
  libraries pick by themselves on 2 cores, i.e. the service before thread budgets;
* ``plain_metrics`` / ``shared_metrics``: 1 worker (so 2 threads per pool on 2 cores: one
  worker's share is the whole budget) with prometheus_client's default value store and with the
  multiprocess store that lets several workers share one /metrics.

Writes ``bench/results/serve_budget.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench import require_shipped_extras
from bench.serve import (
    LUA,
    MODEL,
    RESULTS,
    build_state,
    request_body,
    run_wrk,
    start_service,
    wait_ready,
)
from featurestore.snapshot_writer import SnapshotStore
from freshrec.devstack import LocalStack, free_port
from freshrec.settings import Settings, default_model_config_path
from trainer.publisher import Publisher

VARIANTS: dict[str, tuple[int, dict[str, str]]] = {
    "shipped": (2, {}),
    "unsized": (2, {"FRESHREC_CPU_THREADS": "4"}),
    "plain_metrics": (1, {}),
    "shared_metrics": (1, {"PROMETHEUS_MULTIPROC_DIR": ""}),  # a fresh directory per start
}


def measure(stack: LocalStack, variant: str, rate: int, seconds: int, body_file: Path,
            lua: Path, tmp: Path) -> dict:
    """One fresh service of ``variant`` at ``rate`` req/s; stopped afterwards."""
    workers, extra = VARIANTS[variant]
    extra = dict(extra)
    if "PROMETHEUS_MULTIPROC_DIR" in extra:
        extra["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=tmp)
    port = free_port()
    proc = start_service(stack, port, workers, name=f"service-{variant}", extra_env=extra)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(stack, url, workers, timeout=180)
        run_wrk(f"{url}/v1/score", 100, 2, body_file, lua)  # warm-up
        return run_wrk(f"{url}/v1/score", rate, seconds, body_file, lua, proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        stack.children[:] = [c for c in stack.children if c[1] is not proc]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=int, default=300, help="offered req/s per level")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    require_shipped_extras()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-budget-"))
    stack = LocalStack(topics=("bench.events", "bench.impressions"), partitions=2,
                       log_dir=tmp / "logs")
    stack.start()
    try:
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                            model_name=MODEL, topic_events="bench.events",
                            topic_impressions="bench.impressions",
                            model_config_path=default_model_config_path())
        store = SnapshotStore(redis.Redis.from_url(stack.redis_url), MODEL)
        Publisher(store, build_state(settings), settings).publish_full()
        body_file, lua = tmp / "body.json", tmp / "post.lua"
        body_file.write_text(json.dumps(request_body()))
        lua.write_text(LUA)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        print(f"{'variant':>15} {'round':>5} {'rps':>6} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'cpu ms/req':>10} {'load':>5}")
        for rnd in range(args.rounds):
            for variant in VARIANTS:
                lv = measure(stack, variant, args.rate, args.seconds, body_file, lua, tmp)
                runs[variant].append(lv)
                print(f"{variant:>15} {rnd:>5} {lv['rps']:>6.0f} {lv['p50_ms']:>8.2f} "
                      f"{lv['p99_ms']:>8.2f} {lv['service_cpu_ms_per_req']:>10.2f} "
                      f"{lv['loadavg_1m']:>5.1f}")
        cpu = {v: median(r["service_cpu_ms_per_req"] for r in rs) for v, rs in runs.items()}
        result = {
            "offered_rps": args.rate, "seconds": args.seconds, "rounds": args.rounds,
            "service_cpu_ms_per_req": cpu,
            "unsized_over_shipped_cpu": round(cpu["unsized"] / cpu["shipped"], 2),
            "shared_over_plain_metrics_cpu": round(cpu["shared_metrics"]
                                                   / cpu["plain_metrics"], 3),
            "p99_ms": {v: median(r["p99_ms"] for r in rs) for v, rs in runs.items()},
            "runs": runs, "machine_cpus": os.cpu_count(),
            "note": "shared VM: absolute numbers move with its load (loadavg per run); the "
                    "variants alternate within one run, so their ratios are comparable",
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "serve_budget.json").write_text(json.dumps(result, indent=1))
        print(f"CPU per request, unsized / shipped: {result['unsized_over_shipped_cpu']}x; "
              f"shared / plain metrics: {result['shared_over_plain_metrics_cpu']}x")
        return 0
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
