"""Freshness benchmark: time from a burst of clicks reaching Kafka to a changed served score.

    .venv/bin/python bench/freshness.py            # 200 trials (~2 minutes)
    .venv/bin/python bench/freshness.py --trials 500

Starts its own Redis + broker, the real trainer (``freshrec trainer``) and the real service
(``freshrec service``) as child processes, then per trial: a brand-new user and item (and a
brand-new genre, so no row is shared with earlier trials) are scored — unknown, so their vectors
are zeros — then a burst of clicks for the pair is produced to the events topic (t0 = just
before ``produce``; trials start at a random phase of the publish cycle), and ``/v1/score``
is polled every ~2 ms until the pair's pCTR changes (t1).
Freshness = t1 - t0: Kafka delivery + consumer fetch + batch wait + train step + the wait for
the next publish cycle + Redis transaction + XREAD wake-up + HMGET + apply + the poll interval.

Dense weights are published only at start in this run (``trainer_dense_publish_interval_s`` is
set to an hour) so that a dense update caused by an *earlier* trial cannot masquerade as this
trial's change; the sparse rows of the new pair are the only thing that can change its score.

Writes ``bench/results/freshness.json`` (``p50_s``, ``p99_s``, ``trials``, ...) and
``bench/results/freshness.png`` (histogram).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import orjson
from confluent_kafka import Producer

from freshrec.devstack import LocalStack, free_port
from freshrec.kafka import producer_config

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = {"events": "fresh.events", "impressions": "fresh.impressions", "dlq": "fresh.dlq",
          "clicks": "fresh.clicks"}


def wait_ready(url: str, stack: LocalStack, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problem = stack.check_children()
        if problem:
            raise RuntimeError(problem)
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("service not ready (did the trainer publish?)")


def trial(i: int, client: httpx.Client, producer: Producer, clicks: int,
          timeout: float, poll_s: float) -> float | None:
    """One measurement; None if the score did not change within ``timeout``."""
    user, item = f"fresh-user-{i}", f"fresh-item-{i}"
    body = {"user_id": user, "features": {}, "explore": False, "top_k": 1,
            "candidates": [{"item_id": item, "features": {"genres": [f"fresh-genre-{i}"]}}]}

    def pctr() -> float:
        r = client.post("/v1/score", json=body)
        r.raise_for_status()
        return r.json()["items"][0]["pctr"]

    before = pctr()
    now = time.time()
    t0 = time.perf_counter()
    for k in range(clicks):
        event = {"event_id": f"fresh-{i}-{k}", "ts": now, "user_id": user, "item_id": item,
                 "label": 1, "features": {"genres": [f"fresh-genre-{i}"]}}
        producer.produce(TOPICS["events"], key=user.encode(), value=orjson.dumps(event))
    producer.poll(0)
    while time.perf_counter() - t0 < timeout:
        if pctr() != before:
            return time.perf_counter() - t0
        producer.poll(0)
        time.sleep(poll_s)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--clicks", type=int, default=3, help="clicks per burst")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per trial")
    ap.add_argument("--poll-ms", type=float, default=2.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fresh-"))
    stack = LocalStack(topics=tuple(TOPICS.values()), partitions=2, log_dir=tmp / "logs")
    stack.start()
    try:
        port = free_port()
        overrides = {
            "model_name": "fresh-bench", "topic_events": TOPICS["events"],
            "topic_impressions": TOPICS["impressions"], "topic_dlq": TOPICS["dlq"],
            "topic_clicks": TOPICS["clicks"], "topic_partitions": 2, "service_port": port,
            "trainer_metrics_port": 0, "trainer_group_id": "fresh-bench",
            "trainer_checkpoint_dir": tmp / "ckpt", "trainer_checkpoint_interval_s": 3600,
            "trainer_dense_publish_interval_s": 3600, "data_dir": tmp,
        }
        env = stack.env() | {f"FRESHREC_{k.upper()}": str(v) for k, v in overrides.items()}
        stack.spawn_component("trainer", "trainer", env=env)
        stack.spawn_component("service", "service", env=env)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, stack)
        producer = Producer(producer_config(stack.kafka_bootstrap, **{"linger.ms": 0}))
        client = httpx.Client(base_url=url, timeout=5.0)
        for w in range(5):  # warm-up: consumer group joined, JIT/caches warm
            trial(-1 - w, client, producer, args.clicks, 30.0, args.poll_ms / 1e3)
        rng = np.random.default_rng(0)
        times, failures = [], 0
        started = time.perf_counter()
        for i in range(args.trials):
            t = trial(i, client, producer, args.clicks, args.timeout, args.poll_ms / 1e3)
            if t is None:
                failures += 1
            else:
                times.append(t)
            # Random phase against the 200 ms publish cycle: back-to-back trials would all
            # start right after a publish and measure the full interval every time.
            time.sleep(float(rng.uniform(0.0, 0.25)))
            if (i + 1) % 50 == 0:
                print(f"{i + 1} trials, p50 {np.median(times):.3f}s", flush=True)
        elapsed = time.perf_counter() - started
        t = np.array(times)
        result = {
            "trials": len(times), "failures": failures,
            "p50_s": float(np.percentile(t, 50)), "p90_s": float(np.percentile(t, 90)),
            "p99_s": float(np.percentile(t, 99)), "max_s": float(t.max()),
            "mean_s": float(t.mean()), "clicks_per_burst": args.clicks,
            "poll_ms": args.poll_ms, "publish_interval_ms": 200, "batch_max_wait_ms": 20,
            "elapsed_s": round(elapsed, 1), "loadavg_after": os.getloadavg(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "note": "the VM is shared with other benchmarks/tests; loadavg shows contention",
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "freshness.json").write_text(json.dumps(result, indent=1))
        plot(t, RESULTS / "freshness.png")
        print(f"freshness over {len(times)} trials ({failures} timed out): "
              f"p50 {result['p50_s']:.3f}s  p90 {result['p90_s']:.3f}s  "
              f"p99 {result['p99_s']:.3f}s  max {result['max_s']:.3f}s")
        client.close()
        return 0
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def plot(t: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(t * 1e3, bins=40, color="tab:blue")
    for q, style in ((50, "-"), (99, "--")):
        v = np.percentile(t, q) * 1e3
        ax.axvline(v, color="k", ls=style, label=f"p{q} {v:.0f} ms")
    ax.set_xlabel("click produced -> served score changed (ms)")
    ax.set_ylabel("trials")
    ax.set_title(f"Freshness, {len(t)} trials (publish interval 200 ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
