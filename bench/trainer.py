"""Trainer benchmark: throughput from Kafka, progressive quality against Vowpal Wabbit and River.

    .venv/bin/python bench/trainer.py --quick   # < 2 minutes (smaller synthetic stream, grids)
    .venv/bin/python bench/trainer.py           # 1 M synthetic events, full peer grids

On one machine, in one run:

* throughput: a real :class:`trainer.loop.Trainer` (publisher off), in a process of its own set
  up as ``freshrec trainer`` sets itself up, consuming MovieLens-100K and a synthetic stream
  from a Tansu broker started here, measured from its first consumed batch (the group join,
  ~5 s with this broker, is excluded), the median of three runs per stream; beside
  it a bare confluent-kafka consumer
  that discards what it reads, and a per-stage cost breakdown of the trainer's hot path;
* progressive AUC / logloss on time-ordered MovieLens-100K (predict each example before
  learning it) for freshrec's OnlineLearner, Vowpal Wabbit (logistic, ``-b 18/24``, with and
  without ``-q ui``, a learning-rate grid) and River (LogisticRegression, FMClassifier) on the
  same features in the same order;
* online vs frozen after half the stream, collisionless vs hashed tables of equal memory.

Prints a table and writes ``bench/results/trainer.json`` and ``bench/results/trainer_auc.png``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import median_run, require_shipped_extras
from featurestore.events import parse_labeled_event
from featurestore.featurize import SlotIds, SparseBatch, event_record
from featurestore.schema import ModelConfig, load_model_config
from featurestore.wire_scan import WirePlan, scan_labeled_events
from freshrec.data import fetch_movielens, load_movielens
from freshrec.devstack import LocalStack
from freshrec.kafka import consumer_config
from freshrec.replay import replay
from freshrec.runtime import apply_thread_budget, cpu_budget, tune_gc
from freshrec.settings import DEFAULT_MICRO_BATCH, Settings, default_model_config_path
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.learner import OnlineLearner
from trainer.loop import Trainer
from trainer.progressive import auc, logloss

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"
WINDOW = 5000  # events per point of the AUC-over-stream plot
BATCH = Settings().trainer_batch_max_events  # what the trainer consumes per batch
# Trainer runs per stream from Kafka: a run lasts about a second, so one run is at the mercy
# of a slow moment of the machine; the median of three is reported, every run is kept.
KAFKA_RUNS = 3


# --- data --------------------------------------------------------------------------------------


def movielens_events() -> list[dict[str, Any]]:
    """MovieLens-100K labeled events in time order (label = rating >= 4)."""
    path = DATA if DATA.is_dir() else None
    return list(load_movielens(fetch_movielens(path)).events())


def arrays(events: list[dict[str, Any]]) -> tuple[list[dict], np.ndarray, np.ndarray]:
    records = [event_record(e["user_id"], e["item_id"], e["features"]) for e in events]
    labels = np.array([e["label"] for e in events], dtype=np.float64)
    ts = np.array([e["ts"] for e in events], dtype=np.float64)
    return records, labels, ts


# --- freshrec, in process ----------------------------------------------------------------------


def progressive_freshrec(learner: OnlineLearner, records: list[dict], labels: np.ndarray,
                         ts: np.ndarray, batch: int = BATCH, learn: bool = True) -> np.ndarray:
    """Predictions made before learning, batch by batch like the trainer (micro-steps inside)."""
    probs = np.empty(len(labels))
    for i in range(0, len(labels), batch):
        probs[i:i + batch] = learner.step(records[i:i + batch], labels[i:i + batch],
                                          ts[i:i + batch], learn=learn).probs
    return probs


class HashedIds:
    """Pre-maps the IDs of some slots to ``id % buckets`` before they reach the table.

    Emulates a fixed-size hashed embedding table (colliding IDs share a row) on top of the
    collisionless table, inside the bench only.
    """

    def __init__(self, learner: OnlineLearner, buckets: dict[str, int]) -> None:
        self.buckets = buckets
        self._featurize = learner.featurizer.featurize
        learner.featurizer.featurize = self  # type: ignore[method-assign]

    def __call__(self, records, side=None) -> SparseBatch:
        batch = self._featurize(records, side)
        slots = {name: (SlotIds(ids.ids % self.buckets[name], ids.offsets)
                        if name in self.buckets else ids) for name, ids in batch.slots.items()}
        return SparseBatch(batch.size, slots)


def row_bytes(learner: OnlineLearner, name: str) -> tuple[float, float]:
    """(bytes per live row of the collisionless table, bytes per row of a hashed table)."""
    table = learner.tables[name]
    st = table.stats()
    dim = table.config.dim
    hashed = dim * 4 * 2  # embedding + Adagrad accumulator: a plain array needs nothing else
    return st.bytes / max(st.rows, 1), float(hashed)


# --- peers -------------------------------------------------------------------------------------


def _tok(value: Any) -> str:
    return str(value).replace(" ", "_").replace("|", "_").replace(":", "_")


def peer_features(e: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The same features as freshrec's slots, as tokens: (user side, item side)."""
    f = e["features"]
    user = [f"u={e['user_id']}", f"a={f.get('age')}", f"g={f.get('gender')}",
            f"o={_tok(f.get('occupation'))}", f"z={_tok(f.get('zip_prefix'))}"]
    item = [f"i={e['item_id']}", f"y={f.get('release_year')}"]
    item += [f"genre={_tok(g)}" for g in f.get("genres", [])]
    return user, item


def progressive_vw(events: list[dict[str, Any]], args: str) -> np.ndarray:
    """Vowpal Wabbit, one pass: predict each example, then learn it."""
    from vowpalwabbit import pyvw

    vw = pyvw.Workspace(f"--loss_function logistic --link logistic --quiet {args}")
    probs = np.empty(len(events))
    for k, e in enumerate(events):
        user, item = peer_features(e)
        line = f"{1 if e['label'] else -1} |user {' '.join(user)} |item {' '.join(item)}"
        ex = vw.parse(line)
        probs[k] = vw.predict(ex)
        vw.learn(ex)
        vw.finish_example(ex)
    vw.finish()
    return probs


def progressive_river(events: list[dict[str, Any]], make: Callable[[], Any]) -> np.ndarray:
    """A River classifier, one pass: ``predict_proba_one`` then ``learn_one``."""
    model = make()
    probs = np.empty(len(events))
    for k, e in enumerate(events):
        user, item = peer_features(e)
        x = dict.fromkeys(user + item, 1.0)
        probs[k] = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, bool(e["label"]))
    return probs


def river_run(events: list[dict[str, Any]], name: str, quick: bool) -> np.ndarray:
    """One River model by name (picklable entry point for a worker process)."""
    return progressive_river(events, river_models(quick)[name])


def river_models(quick: bool) -> dict[str, Callable[[], Any]]:
    from river import facto, linear_model, optim

    lrs = (0.05,) if quick else (0.02, 0.05, 0.1)
    models: dict[str, Callable[[], Any]] = {}
    for lr in lrs:
        models[f"LogisticRegression sgd lr={lr}"] = (
            lambda lr=lr: linear_model.LogisticRegression(optimizer=optim.SGD(lr)))
    for lr in (0.05,) if quick else (0.02, 0.05):
        models[f"FMClassifier k=8 lr={lr}"] = (
            lambda lr=lr: facto.FMClassifier(n_factors=8, weight_optimizer=optim.SGD(lr),
                                             latent_optimizer=optim.SGD(lr), seed=0))
    return models


# --- other streams ---------------------------------------------------------------------------


def hex_id(value: str) -> str:
    """A 32-hex-character ID (the shape of UUIDs and hashed IDs): nothing like MovieLens's."""
    return hashlib.md5(value.encode()).hexdigest()


def held_out_stream(n: int) -> list[dict[str, Any]]:
    """A stream no setting was chosen on: drifting tastes (a full rotation over the stream),
    ten times more new items, 32-hex-character user and item IDs, another seed."""
    cfg = SyntheticConfig(seed=20261130, drift_period_s=n / 1000.0, new_items_per_s=20.0,
                          new_item_traffic=0.2, n_users=200_000, n_items=50_000)
    events = list(SyntheticStream(cfg).events(n))
    for e in events:
        e["user_id"], e["item_id"] = hex_id(e["user_id"]), hex_id(e["item_id"])
    return events


def compare_on(events: list[dict[str, Any]], config: ModelConfig, vw_args: list[str],
               river_probs: np.ndarray) -> dict[str, Any]:
    """Progressive AUC of freshrec (as the trainer batches), VW and River LR on ``events``,
    with the ground truth's AUC (``p_true``) as the ceiling."""
    labels = np.array([e["label"] for e in events], dtype=np.float64)
    parsed = [parse_labeled_event(orjson.dumps(e)) for e in events]
    out: dict[str, Any] = {"events": len(events),
                           "oracle_auc": round(auc(labels, np.array([e["p_true"]
                                                                     for e in events])), 4)}
    out["freshrec"] = score(labels, progressive_events(OnlineLearner(config), parsed))
    out["vw"] = {a: score(labels, progressive_vw(events, a)) for a in vw_args}
    out["vw_best_auc"] = max(v["auc"] for v in out["vw"].values())
    out["river_lr"] = score(labels, river_probs)
    out["freshrec_minus_vw_best_auc"] = round(out["freshrec"]["auc"] - out["vw_best_auc"], 4)
    return out


# --- Kafka -------------------------------------------------------------------------------------


def produce(stack: LocalStack, topic: str, events: Iterable[dict[str, Any]], total: int) -> float:
    summary = replay(events, stack.kafka_bootstrap, topic, total=total, progress=False)
    if summary.failed:
        raise RuntimeError(f"producing {topic}: {summary.errors[:3]}")
    return summary.rate


def raw_consume_rate(bootstrap: str, topic: str, total: int, batch: int = BATCH) -> float:
    """A bare consumer reading ``total`` messages and discarding them; events/s after the first."""
    from confluent_kafka import Consumer

    consumer = Consumer(consumer_config(bootstrap, f"raw-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    seen, started = 0, None
    deadline = time.monotonic() + 120
    try:
        while seen < total and time.monotonic() < deadline:
            msgs = consumer.consume(num_messages=batch, timeout=0.1)
            if msgs and started is None:
                started = time.perf_counter()
            seen += sum(1 for m in msgs if m.error() is None)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    finally:
        consumer.close()
    return seen / elapsed if elapsed > 0 else float("nan")


def trainer_rates(stack: LocalStack, topic: str, total: int, checkpoint_dir: Path, runs: int,
                  shipped: bool = False) -> list[dict[str, Any]]:
    """``runs`` real Trainers (no publisher, no hooks; ``shipped``: with the exploration hook
    and the publisher, as ``freshrec trainer`` builds it) one after another, each consuming
    ``total`` events from the start with fresh tables, in a process of their own.

    The deployed trainer is a long-running process that only trains. This one holds both
    streams, the peers' models and their threads: measured inside it, the same trainer read
    85-90 k MovieLens events/s where a process of its own read 102-142 k on the same broker
    and machine. So the runs share a fresh interpreter (spawn, not fork) that sets itself up as
    ``freshrec trainer`` does; the first run also pays that process's one-time warm-up (numba's
    cache load, torch's first kernels), which a trainer pays once in its life.
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(_trainer_rates_here, stack.kafka_bootstrap, stack.redis_url, topic,
                           total, checkpoint_dir, runs, shipped).result(timeout=660 * runs)


def _trainer_rates_here(bootstrap: str, redis_url: str, topic: str, total: int,
                        checkpoint_dir: Path, runs: int, shipped: bool) -> list[dict[str, Any]]:
    """:func:`trainer_rates` in the current process, set up as ``freshrec trainer`` is."""
    apply_thread_budget(cpu_budget(Settings().cpu_threads))
    return [_trainer_rate_here(bootstrap, redis_url, topic, total, checkpoint_dir / str(k),
                               shipped) for k in range(runs)]


def _trainer_rate_here(bootstrap: str, redis_url: str, topic: str, total: int,
                       checkpoint_dir: Path, shipped: bool = False) -> dict[str, Any]:
    """One Trainer from the start of ``topic``; the time runs from the first batch's step."""
    run_id = uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap=bootstrap, redis_url=redis_url,
                        topic_events=topic, trainer_group_id=f"bench-{run_id}",
                        model_name=f"bench-{run_id}",
                        trainer_checkpoint_dir=checkpoint_dir, trainer_metrics_port=0)
    if shipped:
        from trainer.main import build_trainer

        trainer = build_trainer(settings)
    else:
        trainer = Trainer(settings, load_model_config(settings.model_config_path))
    tune_gc()  # as `freshrec trainer` does
    marks: dict[str, float] = {}
    begin, finish = trainer._begin, trainer._finish

    def timed_begin(batch):  # the first batch's step starts the clock ...
        marks.setdefault("first", time.perf_counter())
        return begin(batch)

    def timed_finish(step, outcome):  # ... the last one judged stops it
        finish(step, outcome)
        marks["last"] = time.perf_counter()

    trainer._begin = timed_begin  # type: ignore[method-assign]
    trainer._finish = timed_finish  # type: ignore[method-assign]
    thread = threading.Thread(target=trainer.run, kwargs={"max_events": total}, daemon=True)
    t0 = time.perf_counter()
    thread.start()
    thread.join(600)
    if thread.is_alive():
        raise RuntimeError(f"trainer stuck at {trainer.stats()}")
    elapsed = marks["last"] - marks["first"]
    stats = trainer.stats()
    return {"events": trainer.trained, "events_per_s": trainer.trained / elapsed,
            "seconds": round(elapsed, 2), "group_join_s": round(marks["first"] - t0, 2),
            "window_auc": stats["auc"], "window_logloss": stats["logloss"]}


def stage_costs(events: list[dict[str, Any]], config: ModelConfig) -> dict[str, float]:
    """Microseconds per event of each stage of the trainer's path for a clean batch, in
    process (no Kafka), one stage after another: the wire scan (parse, validate, featurize),
    then the learner's step split into its parts. In the trainer the scan of the next batch
    runs beside the step of this one (``Trainer.run``)."""
    import trainer.learner as learner_module

    raw = [orjson.dumps(e) for e in events]
    plan = WirePlan.of(config)
    warm = OnlineLearner(config)
    for i in range(0, len(raw), BATCH):  # load every kernel; fill the memo-free paths once
        b = scan_labeled_events(raw[i:i + BATCH], plan)
        warm.step_batch(b.sparse, b.labels, b.ts)
    learner = OnlineLearner(config)
    t = dict.fromkeys(("scan", "step", "lookup", "working_set", "deep_forward", "wide",
                       "deep_backward_and_step"), 0.0)

    def timed(owner: Any, name: str, key: str) -> None:
        inner = getattr(owner, name)

        def run(*args: Any, **kwargs: Any) -> Any:
            s0 = time.perf_counter()
            out = inner(*args, **kwargs)
            t[key] += time.perf_counter() - s0
            return out
        setattr(owner, name, run)

    timed(learner, "_rows", "lookup")
    timed(learner, "_dense_update", "deep_backward_and_step")
    timed(learner.model, "forward", "deep_forward")
    module_level = (learner_module.__dict__["_WorkingSet"],
                    learner_module.wide.__dict__["learn_wide"])
    try:
        timed(learner_module, "_WorkingSet", "working_set")
        timed(learner_module.wide, "learn_wide", "wide")
        for i in range(0, len(raw), BATCH):
            t0 = time.perf_counter()
            batch = scan_labeled_events(raw[i:i + BATCH], plan)
            t1 = time.perf_counter()
            learner.step_batch(batch.sparse, batch.labels, batch.ts)
            t["scan"] += t1 - t0
            t["step"] += time.perf_counter() - t1
    finally:
        learner_module._WorkingSet, learner_module.wide.learn_wide = module_level
    n = len(events) / 1e6
    parts = ("lookup", "working_set", "deep_forward", "wide", "deep_backward_and_step")
    out = {"scan_parse_validate_featurize_us": round(t["scan"] / n, 2)}
    out |= {f"{k}_us": round(t[k] / n, 2) for k in parts}
    out["step_other_us"] = round((t["step"] - sum(t[k] for k in parts)) / n, 2)
    out["total_us"] = round((t["scan"] + t["step"]) / n, 2)
    return out


def progressive_events(learner: OnlineLearner, parsed: list[Any]) -> np.ndarray:
    """Trainer.learn's path on parsed events, batch by batch: predictions before learning."""
    probs = np.empty(len(parsed))
    for i in range(0, len(parsed), BATCH):
        chunk = parsed[i:i + BATCH]
        probs[i:i + len(chunk)] = learner.step_batch(
            learner.featurizer.featurize_events(chunk),
            np.fromiter((e.label for e in chunk), np.float64),
            np.fromiter((e.ts for e in chunk), np.float64)).probs
    return probs


def cprofile_top(events: list[dict[str, Any]], config: ModelConfig, k: int = 12
                 ) -> list[dict[str, Any]]:
    """Top functions by own time while scanning and learning ``events`` like Trainer.process."""
    import cProfile
    import pstats

    raw = [orjson.dumps(e) for e in events]
    plan = WirePlan.of(config)
    learner = OnlineLearner(config)

    def work() -> None:
        for i in range(0, len(raw), BATCH):
            batch = scan_labeled_events(raw[i:i + BATCH], plan)
            learner.step_batch(batch.sparse, batch.labels, batch.ts)

    prof = cProfile.Profile()
    prof.runcall(work)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:k]  # type: ignore[attr-defined]
    return [{"function": f"{Path(f).name}:{line}({fn})", "own_share": round(v[2] / total, 3)}
            for (f, line, fn), v in rows]


# --- report ------------------------------------------------------------------------------------


def windowed_auc(labels: np.ndarray, probs: np.ndarray, window: int = WINDOW
                 ) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for end in range(window, len(labels) + 1, window):
        xs.append(end)
        ys.append(auc(labels[end - window:end], probs[end - window:end]))
    return xs, ys


def plot(curves: dict[str, tuple[list[int], list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=name, linewidth=1.4)
    ax.set_xlabel("events (time-ordered MovieLens-100K)")
    ax.set_ylabel(f"progressive AUC over the last {WINDOW} events")
    ax.set_title("Predict-then-learn AUC over the stream")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def score(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    half = len(labels) // 2
    return {"auc": round(auc(labels, probs), 4), "logloss": round(logloss(labels, probs), 4),
            "auc_second_half": round(auc(labels[half:], probs[half:]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="< 2 minutes: smaller runs")
    parser.add_argument("--no-kafka", action="store_true", help="skip the broker measurements")
    parser.add_argument("--redis-outage", action="store_true",
                        help="then the Redis-outage phase (bench/redis_outage.py)")
    args = parser.parse_args()
    require_shipped_extras()
    apply_thread_budget(cpu_budget())  # as `freshrec trainer` sizes its pools
    tune_gc()  # and collects garbage: the in-process stage costs measure the shipped process
    quick = args.quick
    started = time.perf_counter()
    config = load_model_config(default_model_config_path())
    events = movielens_events()
    records, labels, ts = arrays(events)
    out: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "stream": f"MovieLens-100K, {len(events)} ratings in time order, label = rating >= 4",
        "trainer_batch_max_events": BATCH, "micro_batch": DEFAULT_MICRO_BATCH,
    }
    curves: dict[str, tuple[list[int], list[float]]] = {}
    # River is pure Python and the slowest peer: run it in a worker beside freshrec and VW
    # (joined before any throughput is measured).
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    river_jobs = {name: pool.submit(river_run, events, name, quick)
                  for name in river_models(quick)}
    # No regression elsewhere: the synthetic stream the project develops on, and a held-out
    # drifting one with new items and hex IDs (River's LR on them runs in the worker too).
    n_other = 50_000 if quick else 200_000
    others = {"synthetic": list(SyntheticStream(SyntheticConfig(seed=1)).events(n_other)),
              "held_out_drifting_hex_ids": held_out_stream(n_other)}
    river_lr = next(iter(river_models(True)))
    other_river = {k: pool.submit(river_run, ev, river_lr, True) for k, ev in others.items()}

    # freshrec, progressive, exactly as the trainer batches
    t = time.perf_counter()
    probe = OnlineLearner(config)
    fr = progressive_freshrec(probe, records, labels, ts)
    fr_rate = len(labels) / (time.perf_counter() - t)
    out["freshrec"] = score(labels, fr) | {"in_process_events_per_s": round(fr_rate)}
    out["progressive_auc"] = out["freshrec"]["auc"]
    out["progressive_logloss"] = out["freshrec"]["logloss"]
    curves["freshrec (online)"] = windowed_auc(labels, fr)
    # the same learner with one step per consumed batch (micro_batch = batch): what slicing buys
    one = OnlineLearner(config, micro_batch=BATCH)
    out["freshrec_one_step_per_batch"] = score(labels, progressive_freshrec(one, records, labels,
                                                                            ts))

    # online vs frozen on the second half
    half = (len(labels) // 2) // BATCH * BATCH
    learner = OnlineLearner(config)
    progressive_freshrec(learner, records[:half], labels[:half], ts[:half])
    frozen = copy.deepcopy(learner)
    online_p = progressive_freshrec(learner, records[half:], labels[half:], ts[half:])
    frozen_p = progressive_freshrec(frozen, records[half:], labels[half:], ts[half:], learn=False)
    out["online_vs_frozen"] = {"split_at": half,
                               "online_auc": round(auc(labels[half:], online_p), 4),
                               "frozen_auc": round(auc(labels[half:], frozen_p), 4)}
    out["online_minus_frozen_auc"] = round(out["online_vs_frozen"]["online_auc"]
                                           - out["online_vs_frozen"]["frozen_auc"], 4)
    frozen_curve = windowed_auc(labels[half:], frozen_p)
    curves["freshrec frozen after half"] = ([x + half for x in frozen_curve[0]], frozen_curve[1])

    # collisionless vs hashed tables of equal memory (user and item slots)
    hashed_runs = {}
    for label, factor in (("equal_bytes", 1.0), ("quarter_bytes", 0.25)):
        buckets = {}
        for name in ("user", "item"):
            per_live, per_hashed = row_bytes(probe, name)
            buckets[name] = max(1, int(len(probe.tables[name]) * per_live / per_hashed * factor))
        hl = OnlineLearner(config)
        HashedIds(hl, buckets)
        hp = progressive_freshrec(hl, records, labels, ts)
        hashed_runs[label] = {"buckets": buckets, **score(labels, hp)}
    out["hashed"] = {"live_rows": {n: len(probe.tables[n]) for n in ("user", "item")},
                     "bytes_per_live_row": {n: round(row_bytes(probe, n)[0], 1)
                                            for n in ("user", "item")}, **hashed_runs}
    out["collisionless_minus_hashed_auc"] = round(
        out["freshrec"]["auc"] - hashed_runs["equal_bytes"]["auc"], 4)
    out["collisionless_minus_hashed_quarter_auc"] = round(
        out["freshrec"]["auc"] - hashed_runs["quarter_bytes"]["auc"], 4)

    # Vowpal Wabbit: bits x interactions, then a learning-rate grid on the best
    vw: dict[str, dict[str, float]] = {}
    vw_probs: dict[str, np.ndarray] = {}
    for bits in (18, 24):
        for q in ("", " -q ui"):
            a = f"-b {bits}{q}"
            vw_probs[a] = progressive_vw(events, a)
            vw[a] = score(labels, vw_probs[a])
    best_vw = max(vw, key=lambda a: vw[a]["auc"])
    for lr in (0.25, 1.0) if quick else (0.1, 0.25, 1.0, 2.0):
        a = f"{best_vw} -l {lr}"
        vw_probs[a] = progressive_vw(events, a)
        vw[a] = score(labels, vw_probs[a])
    best_vw = max(vw, key=lambda a: vw[a]["auc"])
    out["vw"] = vw
    out["vw_best"] = best_vw
    out["vw_best_auc"] = vw[best_vw]["auc"]
    curves[f"VW {best_vw}"] = windowed_auc(labels, vw_probs[best_vw])
    # VW predicting a whole consumed batch before learning it: freshrec's staleness, for scale
    stale = np.empty(len(events))
    from vowpalwabbit import pyvw

    w = pyvw.Workspace(f"--loss_function logistic --link logistic --quiet {best_vw}")
    for s in range(0, len(events), DEFAULT_MICRO_BATCH):
        chunk = events[s:s + DEFAULT_MICRO_BATCH]
        exs = []
        for e in chunk:
            user, item = peer_features(e)
            exs.append(w.parse(f"{1 if e['label'] else -1} |user {' '.join(user)} "
                               f"|item {' '.join(item)}"))
        for k, ex in enumerate(exs):
            stale[s + k] = w.predict(ex)
        for ex in exs:
            w.learn(ex)
            w.finish_example(ex)
    w.finish()
    out["vw_best_stale_micro_batch"] = score(labels, stale)

    # River
    river: dict[str, dict[str, float]] = {}
    river_probs: dict[str, np.ndarray] = {}
    for name, job in river_jobs.items():
        river_probs[name] = job.result()
        river[name] = score(labels, river_probs[name])
    best_river = max(river, key=lambda n: river[n]["auc"])
    out["river"] = river
    out["river_best"] = best_river
    out["river_best_auc"] = river[best_river]["auc"]
    curves[f"River {best_river}"] = windowed_auc(labels, river_probs[best_river])
    # VW on the other streams at its MovieLens best and at its defaults.
    vw_args = list(dict.fromkeys([best_vw, "-b 24"]))
    out["other_streams"] = {k: compare_on(ev, config, vw_args, other_river[k].result())
                            for k, ev in others.items()}
    pool.shutdown()
    out["quality_seconds"] = round(time.perf_counter() - started, 1)

    # Kafka throughput
    if not args.no_kafka:
        n_syn = 100_000 if quick else 1_000_000
        out["synthetic_events"] = n_syn
        out["synthetic_note"] = ("quick mode: 100k synthetic events (full mode: 1M)" if quick
                                 else "1M synthetic events")
        out["stage_costs_us_per_event"] = stage_costs(events[:30_000], config)
        out["profile_top_own_time"] = cprofile_top(events[:20_000], config)
        topics = ("bench.movielens", "bench.synthetic")
        with LocalStack(topics=(*topics, Settings().topic_dlq), partitions=4) as stack, \
                tempfile.TemporaryDirectory() as tmp:
            produce(stack, topics[0], events, len(events))
            syn = SyntheticStream(SyntheticConfig(seed=1)).events(n_syn)
            produce(stack, topics[1], syn, n_syn)
            kafka: dict[str, Any] = {}
            for topic, total in ((topics[0], len(events)), (topics[1], n_syn)):
                name = topic.split(".")[1]
                raw = raw_consume_rate(stack.kafka_bootstrap, topic, total)
                runs = trainer_rates(stack, topic, total, Path(tmp) / name, KAFKA_RUNS)
                tr = median_run(runs, lambda r: r["events_per_s"])
                kafka[name] = {"raw_consume_per_s": round(raw), **tr,
                               "events_per_s": round(tr["events_per_s"]),
                               "runs_events_per_s": [round(r["events_per_s"]) for r in runs],
                               "share_of_raw": round(tr["events_per_s"] / raw, 3)}
            # As `freshrec trainer` ships: the exploration hook on the stepper and the publisher
            # writing snapshots to the stack's Redis.
            shipped = trainer_rates(stack, topics[0], len(events), Path(tmp) / "shipped",
                                    KAFKA_RUNS, shipped=True)
            kafka["movielens_as_shipped"] = {
                "events_per_s": round(median_run(shipped, lambda r: r["events_per_s"])
                                      ["events_per_s"]),
                "runs_events_per_s": [round(r["events_per_s"]) for r in shipped],
                "with": "exploration hook and publisher (trainer.main.build_trainer)"}
            out["kafka"] = kafka
        out["events_per_s"] = kafka["movielens"]["events_per_s"]
        out["events_per_s_as_shipped"] = kafka["movielens_as_shipped"]["events_per_s"]
        out["raw_consume_per_s"] = kafka["movielens"]["raw_consume_per_s"]
        out["events_per_s_synthetic"] = kafka["synthetic"]["events_per_s"]
        out["raw_consume_per_s_synthetic"] = kafka["synthetic"]["raw_consume_per_s"]

    out["targets"] = targets(out)
    out["notes"] = notes(out)
    out["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if (RESULTS / "trainer.json").exists():  # keep bench/redis_outage.py's keys
        old = json.loads((RESULTS / "trainer.json").read_text())
        out |= {k: v for k, v in old.items() if k.startswith("redis_outage")}
    (RESULTS / "trainer.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(curves, RESULTS / "trainer_auc.png")
    print_table(out)
    if args.redis_outage:
        from bench.redis_outage import outage_phase
        from bench.results_file import merge_into

        merge_into(RESULTS / "trainer.json", outage_phase())


def targets(out: dict[str, Any]) -> dict[str, bool]:
    t = {"auc_ge_vw_best_plus_0.01": out["progressive_auc"] >= out["vw_best_auc"] + 0.01,
         "other_streams_auc_ge_vw_best": all(
             o["freshrec"]["auc"] >= o["vw_best_auc"] for o in out.get("other_streams", {})
             .values()),
         "auc_ge_river_best": out["progressive_auc"] >= out["river_best_auc"],
         "online_beats_frozen_by_0.02": out["online_minus_frozen_auc"] >= 0.02}
    if "events_per_s" in out:
        t["events_per_s_ge_100k"] = out["events_per_s"] >= 100_000
        t["events_per_s_ge_30pct_raw"] = out["events_per_s"] >= 0.3 * out["raw_consume_per_s"]
    return t


def notes(out: dict[str, Any]) -> list[str]:
    n = []
    st = out.get("stage_costs_us_per_event")
    if st:
        step = st["total_us"] - st["scan_parse_validate_featurize_us"]
        n.append(
            f"Trainer hot path per event (in process, consumed batches of "
            f"{out['trainer_batch_max_events']}): wire scan (parse, validate, featurize) "
            f"{st['scan_parse_validate_featurize_us']} us on the training thread; on the "
            f"stepper thread table lookups {st['lookup_us']} us, working set "
            f"{st['working_set_us']} us, deep forward {st['deep_forward_us']} us, wide per "
            f"example {st['wide_us']} us, deep backward + Adam in slices of {out['micro_batch']} "
            f"{st['deep_backward_and_step_us']} us, rest {st['step_other_us']} us: the step "
            f"(~{step:.1f} us) bounds the pipelined loop at ~{1e6 / step:,.0f} events/s.")
    n.append(
        f"Staleness: the wide part (ID biases, FM factors) has learned every earlier example; "
        f"the deep part every earlier slice of {out['micro_batch']}. One deep step per "
        f"consumed batch of {out['trainer_batch_max_events']} gives AUC "
        f"{out['freshrec_one_step_per_batch']['auc']} vs {out['progressive_auc']}. VW "
        f"predicting slices of {out['micro_batch']} before learning them scores "
        f"{out['vw_best_stale_micro_batch']['auc']} (one at a time: {out['vw_best_auc']}).")
    return n


def print_table(out: dict[str, Any]) -> None:
    rows = [("freshrec progressive AUC", out["progressive_auc"]),
            ("freshrec logloss", out["progressive_logloss"]),
            ("freshrec, deep part one step per consumed batch AUC",
             out["freshrec_one_step_per_batch"]["auc"]),
            (f"VW best ({out['vw_best']}) AUC", out["vw_best_auc"]),
            ("VW best, stale micro-batches AUC", out["vw_best_stale_micro_batch"]["auc"]),
            (f"River best ({out['river_best']}) AUC", out["river_best_auc"]),
            ("online - frozen AUC (2nd half)", out["online_minus_frozen_auc"]),
            ("collisionless - hashed (equal bytes) AUC", out["collisionless_minus_hashed_auc"]),
            ("collisionless - hashed (1/4 bytes) AUC",
             out["collisionless_minus_hashed_quarter_auc"])]
    for name, o in out.get("other_streams", {}).items():
        rows.append((f"{name}: freshrec / VW best / River LR / oracle AUC",
                     f"{o['freshrec']['auc']} / {o['vw_best_auc']} / {o['river_lr']['auc']} / "
                     f"{o['oracle_auc']}"))
    if "kafka" in out:
        for name, k in out["kafka"].items():
            rows.append((f"trainer from Kafka, {name} (events/s)", k["events_per_s"]))
            if "raw_consume_per_s" in k:
                rows.append((f"raw consume, {name} (events/s)", k["raw_consume_per_s"]))
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value:,}" if isinstance(value, int) else
              f"{name:<{width}}  {value}")
    for k, v in out["targets"].items():
        print(f"target {k}: {'met' if v else 'SHORT'}")
    print(f"({out['mode']} mode, {out['seconds']} s) -> {RESULTS / 'trainer.json'}")


if __name__ == "__main__":
    main()
