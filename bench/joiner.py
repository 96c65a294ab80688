"""The joiner through Kafka, and the closed loop against a non-learning baseline.

Two parts, one run:

1. **Joiner throughput through Kafka.** The stream of ``bench/joiner_core.py`` (requests of 10
   shown items, 5% click rate, exponential click delays) is produced to a real broker, keyed by
   user id as the service keys impressions and clicks; a :class:`joiner.process.JoinerProcess`,
   in a process of its own set up as ``freshrec joiner`` sets itself up, consumes it and
   produces every label to the events topic. Shown items per second from the
   first consumed batch handed to the joiner until every impression and click is handled,
   beside the broker's raw consume rate of the same messages and the pure join (no Kafka) of
   ``joiner_core``. Join delay: event time from impression to emitted label.
2. **Closed loop.** Trainer, joiner and service run as processes; simulated users with known
   click probabilities (:mod:`freshrec.simulate`) request scores and click by ground truth. The
   non-learning baseline is a random top-k of the same candidates (same requests, same run); the
   oracle is the true top-k. ``closed_loop_ctr_lift`` = final-window served CTR ÷ baseline CTR
   (expected CTR, i.e. mean true p of what was shown: the realised clicks are noisier).

    .venv/bin/python bench/joiner.py --quick     # < 2 minutes
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import median_run, require_shipped_extras
from bench.joiner_core import ITEMS_PER_REQUEST, make_stream
from freshrec.devstack import LocalStack, free_port
from freshrec.kafka import (
    DeliveryTracker,
    consumer_config,
    produce_all,
    producer_config,
)
from freshrec.metrics import JoinerMetrics, scrape
from freshrec.runtime import apply_thread_budget, cpu_budget, tune_gc
from freshrec.settings import Settings
from freshrec.simulate import ClosedLoop, ClosedLoopConfig
from joiner.process import JoinerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Every message keyed by its user id, as the service keys impressions and clicks (so a
    user's impressions and clicks share a partition number, and every partition has input)."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    tracker = DeliveryTracker()
    produce_all(producer, topic, [(orjson.loads(v)["user_id"].encode(), v) for v in values],
                tracker)
    producer.flush(60)
    if tracker.failed:
        raise RuntimeError(tracker.errors)


def raw_consume_rate(bootstrap: str, topics: list[str], expected: int) -> float:
    """Messages per second for a bare consumer that discards everything."""
    consumer = Consumer(consumer_config(bootstrap, f"raw-{time.time()}"))
    tps = []
    for topic in topics:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        tps += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts]
    consumer.assign(tps)
    n, started = 0, None
    deadline = time.monotonic() + 60
    while n < expected and time.monotonic() < deadline:
        msgs = consumer.consume(10_000, timeout=0.5)
        if msgs and started is None:
            started = time.perf_counter()
        n += len(msgs)
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return n / elapsed if elapsed > 0 else float("nan")


# Requests per second of event time in the through-Kafka stream: it spans five 20 s windows,
# so the timed part closes most windows and builds and produces their negatives, the joiner's
# steady-state work. At 1,000/s a 20,000-request stream spanned one window and closed none:
# the figure then left out every negative.
THROUGH_KAFKA_PER_S = 200.0
JOINER_RUNS = 3


def joiner_through_kafka(stack: LocalStack, n_requests: int, work: Path) -> dict:
    """Produce the stream, run a JoinerProcess until every label is out, time it."""
    stream, _ = make_stream(n_requests, seed=1, per_s=THROUGH_KAFKA_PER_S)
    imps = [v for k, v in stream if k == "imp"]
    clicks = [v for k, v in stream if k == "click"]
    settings = Settings(
        kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
        topic_impressions="bj.impressions", topic_clicks="bj.clicks", topic_events="bj.events",
        topic_dlq="bj.dlq", joiner_window_s=20.0, joiner_lateness_s=2.0,
        joiner_checkpoint_dir=work / "joiner-ckpt", joiner_metrics_port=0,
        joiner_checkpoint_interval_s=3600, joiner_group_id="bj")
    from freshrec.kafka import create_topics

    create_topics(stack.kafka_bootstrap, ["bj.impressions", "bj.clicks", "bj.events", "bj.dlq"],
                  partitions=2)
    _produce(stack.kafka_bootstrap, "bj.impressions", imps)
    _produce(stack.kafka_bootstrap, "bj.clicks", clicks)
    raw_rate = raw_consume_rate(stack.kafka_bootstrap, ["bj.impressions", "bj.clicks"],
                                len(imps) + len(clicks))
    # The joiner runs in a process of its own, as deployed: not in this one, which holds the
    # stream and the producers' and raw consumer's state.
    # A run lasts about a second, at the mercy of a slow moment of the machine: the median of
    # JOINER_RUNS runs is reported (each its own consumer group and fresh state), every run kept.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        runs = pool.submit(_run_joiners_here, settings, n_requests, len(clicks),
                           JOINER_RUNS).result(timeout=300 * JOINER_RUNS)
    shown = n_requests * ITEMS_PER_REQUEST
    def rate(r: dict) -> float:
        return shown / r["elapsed"] if r["done"] else float("nan")

    run = median_run(runs, rate)
    elapsed, delays, done = run["elapsed"], run["delays"], run["done"]
    return {
        "requests": n_requests,
        "shown_items": shown,
        "clicks": len(clicks),
        "event_seconds": n_requests / THROUGH_KAFKA_PER_S,
        "labels_in_timed_part": run["labels_timed"],
        "impressions_per_s": shown / elapsed if done else float("nan"),
        "runs_impressions_per_s": [round(rate(r)) if r["done"] else None for r in runs],
        "raw_consume_msgs_per_s": raw_rate,
        "raw_consume_shown_items_per_s": raw_rate * len(imps) * ITEMS_PER_REQUEST
        / (len(imps) + len(clicks)),
        "join_delay_p50_s": float(np.percentile(delays, 50)) if delays else None,
        "join_delay_p99_s": float(np.percentile(delays, 99)) if delays else None,
        "counts": run["counts"],
        "seconds": elapsed,
    }


def _run_joiners_here(settings: Settings, n_requests: int, n_clicks: int, runs: int
                      ) -> list[dict]:
    """``runs`` joiners one after another, each with its own group and checkpoint."""
    return [_run_joiner_here(settings.model_copy(update={
        "joiner_group_id": f"{settings.joiner_group_id}-{k}",
        "joiner_checkpoint_dir": settings.joiner_checkpoint_dir / str(k)}), n_requests, n_clicks)
        for k in range(runs)]


def _run_joiner_here(settings: Settings, n_requests: int, n_clicks: int) -> dict:
    """A JoinerProcess set up as ``freshrec joiner`` sets itself up, run until every impression
    and click is handled; the time runs from the first consumed batch handed to it."""
    metrics = JoinerMetrics()
    apply_thread_budget(cpu_budget(settings.cpu_threads))  # as `freshrec joiner` does
    process = JoinerProcess(settings, metrics)
    tune_gc()  # as `freshrec joiner` does
    stop = threading.Event()
    delays: list[float] = []
    original_drain = process.joiner.drain_join_delays

    def drain() -> np.ndarray:  # keep the delays for percentiles (the metric has buckets)
        d = original_drain()
        delays.extend(d.tolist())
        return d

    process.joiner.drain_join_delays = drain  # type: ignore[method-assign]
    # The clock starts when the first consumed batch is handed to the joiner, as the trainer
    # bench's starts at its first batch's step (the group join and the first fetch are out).
    marks: dict[str, float] = {}
    handle_batch = process.handle_batch

    def timed_handle_batch(messages: list) -> None:
        if messages:
            marks.setdefault("first", time.perf_counter())
        handle_batch(messages)

    process.handle_batch = timed_handle_batch  # type: ignore[method-assign]
    thread = threading.Thread(target=process.run, args=(stop,), daemon=True)
    thread.start()
    done_at, labels_timed = None, 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        consumed = metrics.registry.get_sample_value("freshrec_joiner_impressions_total") or 0
        clicks_read = sum(o for (t, _), o in list(process.offsets.items())
                          if t == settings.topic_clicks)
        # Caught up: every impression and click consumed and handled (clicks ahead of the
        # impressions stream wait in the process, as designed). The windows still open at the
        # end of a finite stream close later, on the idle advance, and are not timed.
        if consumed >= n_requests and clicks_read >= n_clicks:
            done_at = time.perf_counter()
            labels_timed = sum(metrics.registry.get_sample_value(
                "freshrec_joiner_examples_total", {"label": lab}) or 0 for lab in ("0", "1"))
            break
        time.sleep(0.01)
    stop.set()
    thread.join(30)
    gc.unfreeze()
    elapsed = (done_at or time.perf_counter()) - marks.get("first", time.perf_counter())
    return {"elapsed": elapsed, "done": done_at is not None, "labels_timed": labels_timed,
            "delays": delays, "counts": asdict(process.joiner.counts())}


def _trained(port: int) -> float:
    return scrape(f"http://127.0.0.1:{port}/metrics").get(
        "freshrec_trainer_events_total{outcome=trained}", 0.0)


def closed_loop(stack: LocalStack, requests: int, rate: float, work: Path) -> dict:
    """The whole pipeline with simulated users; CTR per window against random and oracle."""
    port, trainer_port = free_port(), free_port()
    env = stack.env()
    env.update({
        "FRESHREC_SERVICE_PORT": str(port), "FRESHREC_TRAINER_METRICS_PORT": str(trainer_port),
        "FRESHREC_JOINER_METRICS_PORT": "0", "FRESHREC_JOINER_WINDOW_S": "2",
        "FRESHREC_JOINER_LATENESS_S": "0.2", "FRESHREC_TRAINER_PUBLISH_INTERVAL_MS": "100",
        "FRESHREC_BANDIT_CLUSTERS": "8", "FRESHREC_BANDIT_ALPHA": "0.3",
        "FRESHREC_MODEL_NAME": "bench-loop", "FRESHREC_TOPIC_EVENTS": "loop.events",
        "FRESHREC_TOPIC_IMPRESSIONS": "loop.impressions", "FRESHREC_TOPIC_CLICKS": "loop.clicks",
        "FRESHREC_TOPIC_DLQ": "loop.dlq", "FRESHREC_TRAINER_GROUP_ID": "loop-trainer",
        "FRESHREC_JOINER_GROUP_ID": "loop-joiner",
        "FRESHREC_TRAINER_CHECKPOINT_DIR": str(work / "trainer-ckpt"),
        "FRESHREC_JOINER_CHECKPOINT_DIR": str(work / "joiner-ckpt"),
    })
    pipeline = LocalStack(external_kafka=stack.kafka_bootstrap, external_redis=stack.redis_url,
                          log_dir=work / "logs")
    try:
        pipeline.start_pipeline(env, f"http://127.0.0.1:{port}/readyz", timeout=120)
        loop = ClosedLoop(f"http://127.0.0.1:{port}", stack.kafka_bootstrap, "loop.clicks",
                          ClosedLoopConfig(requests=requests, window=max(100, requests // 12),
                                           rate=rate, seed=7))
        warmup = loop.warm_up(lambda: _trained(trainer_port) > 0)
        result = loop.run(progress=True)
    finally:
        pipeline.stop()
    return {
        "requests": requests, "rate_per_s": rate, "warmup_requests": warmup,
        "windows": result.windows, "untrained": result.untrained,
        "closed_loop_ctr_lift": result.ctr_lift,
        "oracle_lift": result.windows[-1]["oracle_p"] / result.windows[-1]["random_p"],
        "new_items": len(result.new_items),
        "new_items_discovered_share": result.discovered_share(min_age=requests // 6),
        "new_items_discovered_by_exploration": result.discovered_by_exploration,
        "discovery_requests_median": (float(np.median(result.discovery_requests))
                                      if result.discovery_requests else None),
        "errors": result.errors,
    }


def plot(loop: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = loop["windows"]
    x = [r["request"] for r in w]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r["served_p"] for r in w], "o-", label="freshrec (expected CTR served)")
    ax.plot(x, [r["ctr"] for r in w], ".:", alpha=0.6, label="freshrec (realised CTR)")
    ax.plot(x, [r["random_p"] for r in w], "s--", label="non-learning baseline (random top-k)")
    ax.plot(x, [r["oracle_p"] for r in w], "^--", label="oracle top-k")
    if loop.get("untrained"):
        ax.axhline(loop["untrained"]["served_p"], color="grey", lw=0.8,
                   label="served before any learning")
    ax.set_xlabel("requests")
    ax.set_ylabel("CTR of shown items")
    ax.set_title("Closed loop: clicks -> Kafka -> joiner -> trainer -> Redis -> service")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    require_shipped_extras()
    n_requests = 20_000 if args.quick else 100_000
    loop_requests, loop_rate = (4000, 100.0) if args.quick else (12_000, 100.0)
    with tempfile.TemporaryDirectory() as tmp, LocalStack(log_dir=Path(tmp) / "stack") as stack:
        work = Path(tmp)
        joined = joiner_through_kafka(stack, n_requests, work)
        loop = closed_loop(stack, loop_requests, loop_rate, work)
    core_path = RESULTS / "joiner_core.json"
    core = orjson.loads(core_path.read_bytes()) if core_path.exists() else {}
    res = {
        "benchmark": "joiner", "quick": args.quick,
        "impressions_per_s": joined["impressions_per_s"],
        "join_delay_p99_s": joined["join_delay_p99_s"],
        "closed_loop_ctr_lift": loop["closed_loop_ctr_lift"],
        "pure_join_impressions_per_s": (core.get("impressions_per_s", {})
                                        .get("shown_items_per_s")),
        "through_kafka": joined,
        "closed_loop": loop,
        "units": "impressions = shown items (10 per request)",
        "target_impressions_per_s": 200_000,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "joiner.json").write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    plot(loop, RESULTS / "joiner_ctr.png")
    print(f"{'metric':<44}{'value':>14}")
    for key, value in [
        ("shown items/s through Kafka (joiner)", joined["impressions_per_s"]),
        ("shown items/s raw consume (same topics)", joined["raw_consume_shown_items_per_s"]),
        ("shown items/s pure join (joiner_core)", res["pure_join_impressions_per_s"]),
        ("join delay p50 s (event time)", joined["join_delay_p50_s"]),
        ("join delay p99 s (event time)", joined["join_delay_p99_s"]),
        ("closed-loop CTR lift vs random", loop["closed_loop_ctr_lift"]),
        ("oracle lift vs random", loop["oracle_lift"]),
        ("new items discovered share", loop["new_items_discovered_share"]),
    ]:
        print(f"{key:<44}{value if value is not None else float('nan'):>14.3f}")


if __name__ == "__main__":
    main()
