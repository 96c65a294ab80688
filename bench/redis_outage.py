"""Trainer throughput while Redis is away: ``redis_outage_throughput_ratio`` in trainer.json.

    .venv/bin/python bench/redis_outage.py              # ~2 minutes
    .venv/bin/python bench/trainer.py --redis-outage    # the same phase after the trainer bench

A real trainer as ``freshrec trainer`` wires it (exploration hook, background publisher, default
settings) consumes a synthetic backlog from a Tansu broker started here and publishes to a
redis-server of this script's own. Its events/s are sampled from its trained counter: over a
normal window (Redis up, a delta every 200 ms), then over a window during which redis-server is
killed (connections refused: the publisher thread retries and merges), then — once Redis was
restarted empty and the publisher wrote its full snapshot — over a second normal window. The
ratio is outage / the mean of the two normal windows (the machine's drift cancels), measured in
the same run on the same backlog.

Merges its keys into ``bench/results/trainer.json`` (read-modify-write: the trainer bench's
keys stay) and can run standalone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.results_file import RESULTS, merge_into
from freshrec.devstack import LocalStack, free_port, redis_server_binary, wait_for_redis
from freshrec.replay import replay
from freshrec.runtime import tune_gc
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.main import build_trainer

TOPIC = "bench.outage"
TARGET = 0.9


def start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(redis_server_binary()), "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    wait_for_redis(f"redis://127.0.0.1:{port}/0")
    return proc


def rate_between(samples: list[tuple[float, int]], t0: float, t1: float) -> float:
    """Events/s between two times, from (time, trained) samples."""
    inside = [(t, n) for t, n in samples if t0 <= t <= t1]
    if len(inside) < 2:
        return float("nan")
    (ta, na), (tb, nb) = inside[0], inside[-1]
    return (nb - na) / (tb - ta)


def outage_phase(events: int = 2_000_000, normal_s: float = 15.0, outage_s: float = 30.0
                 ) -> dict:
    """Run the phase end to end; returns the keys it merges into trainer.json."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    port = free_port()
    redis_proc = start_redis(port)
    redis_url = f"redis://127.0.0.1:{port}/0"
    stack = LocalStack(topics=(TOPIC, Settings().topic_dlq), partitions=4,
                       external_redis=redis_url, log_dir=tmp / "logs")
    stack.start()
    try:
        summary = replay(SyntheticStream(SyntheticConfig(seed=3)).events(events),
                         stack.kafka_bootstrap, TOPIC, total=events, progress=False)
        if summary.failed:
            raise RuntimeError(f"producing: {summary.errors[:3]}")
        settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=redis_url,
                            topic_events=TOPIC, model_name="bench-outage",
                            trainer_group_id=f"bench-{uuid.uuid4().hex[:8]}",
                            trainer_checkpoint_dir=tmp / "ckpt", trainer_metrics_port=0)
        trainer = build_trainer(settings)
        tune_gc()  # as `freshrec trainer` does
        stop = threading.Event()
        thread = threading.Thread(target=trainer.run, args=(stop,), daemon=True)
        thread.start()
        samples: list[tuple[float, int]] = []

        def sample_for(seconds: float) -> tuple[float, float]:
            t0 = time.monotonic()
            while time.monotonic() < t0 + seconds:
                samples.append((time.monotonic(), trainer.trained))
                time.sleep(0.25)
            return t0, time.monotonic()

        deadline = time.monotonic() + 120
        while trainer.trained < 20_000:  # group join and warm-up (JIT, first full snapshot)
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("trainer did not start")
            time.sleep(0.1)
        m = trainer.metrics.registry.get_sample_value
        before = sample_for(normal_s)
        os.kill(redis_proc.pid, signal.SIGKILL)
        redis_proc.wait()
        outage = sample_for(outage_s)
        redis_proc = start_redis(port)  # back, empty: a full snapshot follows
        fulls = m("freshrec_trainer_publishes_total", {"kind": "full"}) or 0.0
        t0 = time.monotonic()
        while (m("freshrec_trainer_publishes_total", {"kind": "full"}) or 0.0) <= fulls:
            if time.monotonic() > t0 + 60:
                raise RuntimeError("no full snapshot after Redis came back")
            time.sleep(0.1)
        recovered_s = time.monotonic() - t0
        after = sample_for(normal_s)
        stop.set()
        thread.join(120)
        rates = {name: rate_between(samples, *window) for name, window in
                 (("before", before), ("outage", outage), ("after", after))}
        # Normal = Redis up on both sides of the outage: the machine's drift cancels out.
        normal = (rates["before"] + rates["after"]) / 2
        backlog_left = events - trainer.trained - trainer.dead_lettered
        return {
            "redis_outage_throughput_ratio": round(rates["outage"] / normal, 3),
            "redis_outage": {
                "events_per_s": {k: round(v) for k, v in rates.items()},
                "full_snapshot_after_restart_s": round(recovered_s, 2),
                "windows_s": {"normal_each": normal_s, "outage": outage_s},
                "backlog_events": events, "backlog_left": backlog_left,
                "publish_failures": m("freshrec_trainer_publish_failures_total"),
                "merged_deltas": m("freshrec_trainer_publish_merged_deltas_total"),
                "overflows": m("freshrec_trainer_publish_overflows_total"),
                "skipped_cycles": m("freshrec_trainer_publish_skipped_total"),
                "full_publishes": m("freshrec_trainer_publishes_total", {"kind": "full"}),
                "target": TARGET, "loadavg": os.getloadavg(),
            },
        }
    finally:
        stack.stop()
        redis_proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=2_000_000, help="backlog produced up front")
    ap.add_argument("--outage-s", type=float, default=30.0)
    ap.add_argument("--normal-s", type=float, default=15.0)
    args = ap.parse_args()
    keys = outage_phase(args.events, args.normal_s, args.outage_s)
    merge_into(RESULTS / "trainer.json", keys)
    o = keys["redis_outage"]
    print(f"events/s before {o['events_per_s']['before']}, during the outage "
          f"{o['events_per_s']['outage']}, after {o['events_per_s']['after']}; "
          f"redis_outage_throughput_ratio {keys['redis_outage_throughput_ratio']} "
          f"(target >= {TARGET}); backlog left {o['backlog_left']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
