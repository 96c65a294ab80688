"""Micro-benchmark of the pure online join (no Kafka): how many shown items per second.

A synthetic stream in event-time order: requests of 10 shown items at 1,000 requests/s of event
time, each item clicked with probability 5% after an exponential delay (mean 5 s, so ~2% of the
clicks land after the 20 s window), 10% of clicks without a request id, watermark advanced every
1,000 messages to the max event time minus 2 s of allowed lateness.

Three timings, so object construction is not mistaken for join cost:
  * parse:  ``parse_impression``/``parse_click`` (msgspec) of the raw Kafka values only;
  * join:   the joiner fed already-parsed objects (``add_impression``/``join_click``/``advance``);
  * e2e:    parse + join from raw bytes, what the integrated consumer pays before producing;
the labels come out as the bytes the process produces (``advance_labels``, ``join_click().labels``:
encoding is part of the join), plus the size and time of a ``state()`` snapshot at the end of the
run (the checkpoint cost at that pending size).

    .venv/bin/python bench/joiner_core.py --quick     # < 30 s
    .venv/bin/python bench/joiner_core.py             # 200k requests, ~3 min
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.events import AnyClick, AnyImpression, parse_click, parse_impression
from joiner.join import Joiner, Label

ITEMS_PER_REQUEST = 10
CLICK_RATE = 0.05
REQUESTS_PER_EVENT_S = 1000.0
WINDOW_S = 20.0
LATENESS_S = 2.0
ADVANCE_EVERY = 1000
GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "War"]


def make_stream(n_requests: int, seed: int, per_s: float = REQUESTS_PER_EVENT_S
                ) -> tuple[list[tuple[str, bytes]], dict[str, float]]:
    """Raw JSON messages (kind, value) in event-time order, and request id -> impression ts;
    ``per_s`` requests per second of event time.

    Built with orjson directly (the schema is checked once, by parsing, in the timed part).
    """
    rng = np.random.default_rng(seed)
    msgs: list[tuple[float, int, str, bytes]] = []
    imp_ts: dict[str, float] = {}
    n_items, n_users = 5000, 20_000
    users = rng.integers(n_users, size=n_requests)
    clicked = rng.random((n_requests, ITEMS_PER_REQUEST)) < CLICK_RATE
    for r in range(n_requests):
        ts = 1_700_000_000.0 + r / per_s
        rid = f"req-{r:09d}"
        user = f"u{int(users[r])}"
        items = rng.choice(n_items, ITEMS_PER_REQUEST, replace=False).tolist()
        clusters = rng.choice(32, 3, replace=False).tolist()
        imp = {
            "request_id": rid, "ts": ts, "user_id": user, "model_version": 42,
            "features": {"age": "25", "gender": "F", "occupation": "4", "zip_prefix": "941",
                         "hour": 13},
            "items": [{"item_id": f"m{i}", "position": p, "score": 1.0 - p / 20, "pctr": 0.05,
                       "bonus": 0.01, "explored": p == 9,
                       "features": {"genres": [GENRES[i % 8], GENRES[i % 5]]}}
                      for p, i in enumerate(items)],
            "context": {"clusters": clusters, "weights": [0.5, 0.3, 0.2]},
        }
        imp_ts[rid] = ts
        msgs.append((ts, len(msgs), "imp", orjson.dumps(imp)))
        for k in np.flatnonzero(clicked[r]).tolist():
            cts = ts + float(rng.exponential(5.0))
            clk = {"event_id": f"clk-{r}-{items[k]}", "ts": cts, "user_id": user,
                   "item_id": f"m{items[k]}"}
            if rng.random() < 0.9:
                clk["request_id"] = rid
            msgs.append((cts, len(msgs), "click", orjson.dumps(clk)))
    msgs.sort()
    return [(k, v) for _, _, k, v in msgs], imp_ts


def parse(raw: list[tuple[str, bytes]]) -> list[tuple[str, AnyImpression | AnyClick]]:
    return [(k, parse_impression(v) if k == "imp" else parse_click(v)) for k, v in raw]


class Sink:
    """Stands in for the producer: counts what would be produced and keeps nothing else alive,
    so the benchmark's heap is the joiner's state (as in production), not a list of outputs."""

    def __init__(self, imp_ts: dict[str, float]) -> None:
        self.n = 0
        self.imp_ts = imp_ts
        self.pos_delays: list[float] = []
        self.delays = np.empty(0)

    def __call__(self, labels: list[Label], click: AnyClick | None = None,
                 request_id: str | None = None) -> None:
        """``labels`` from ``advance_labels``, or the positive(s) of ``click`` on ``request_id``."""
        self.n += len(labels)
        if click is not None and request_id is not None:
            self.pos_delays += [click.ts - self.imp_ts[request_id]] * len(labels)


def run_join(joiner: Joiner, parsed: list[tuple[str, AnyImpression | AnyClick]], sink: Sink,
             final: bool = True) -> None:
    """The consumer loop minus Kafka: what the integrated joiner does per message."""
    high = -np.inf
    add_imp, join_click, advance = joiner.add_impression, joiner.join_click, joiner.advance_labels
    for n, (kind, m) in enumerate(parsed, 1):
        if m.ts > high:
            high = m.ts
        if kind == "imp":
            add_imp(m)
        else:
            res = join_click(m)
            if res.labels:
                sink(res.labels, m, res.request_id)
        if n % ADVANCE_EVERY == 0:
            sink(advance(high - LATENESS_S))
    if final:
        # Steady-state join delays, before the end-of-stream flush inflates them.
        sink.delays = joiner.drain_join_delays()
        sink(advance(high + WINDOW_S + 1))


def run_e2e(joiner: Joiner, raw: list[tuple[str, bytes]], sink: Sink) -> None:
    """Parse each raw Kafka value, then join: the integrated consumer's cost per message."""
    high = -np.inf
    imp_json, click_json = parse_impression, parse_click
    add_imp, join_click, advance = joiner.add_impression, joiner.join_click, joiner.advance_labels
    for n, (kind, v) in enumerate(raw, 1):
        if kind == "imp":
            m = imp_json(v)
            add_imp(m)
        else:
            m = click_json(v)
            res = join_click(m)
            if res.labels:
                sink(res.labels, m, res.request_id)
        if m.ts > high:
            high = m.ts
        if n % ADVANCE_EVERY == 0:
            sink(advance(high - LATENESS_S))
    sink(advance(high + WINDOW_S + 1))


# What the integrated joiner process should set after start-up (see docs/joiner.md): the window's
# state is long-lived, so the default thresholds make CPython rescan it over and over.
TUNED_GC = (50_000, 20, 100)


def timed(fn, gc_mode: str) -> float:
    """Run ``fn`` under one GC policy: ``default`` (700, 10, 10), ``tuned`` or ``off``."""
    default = gc.get_threshold()
    gc.collect()
    if gc_mode == "tuned":
        gc.set_threshold(*TUNED_GC)
    elif gc_mode == "off":
        gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        gc.enable()
        gc.set_threshold(*default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30k requests (300k shown items)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "joiner_core.json")
    args = ap.parse_args()
    n_req = args.requests or (30_000 if args.quick else 200_000)
    n_items = n_req * ITEMS_PER_REQUEST

    t0 = time.perf_counter()
    raw, imp_ts = make_stream(n_req, seed=0)
    gen_s = time.perf_counter() - t0
    n_clicks = sum(k == "click" for k, _ in raw)

    # Parse cost alone, without a growing heap of retained results for the GC to rescan (a real
    # consumer drops each message after joining it); then keep one parsed copy for the join.
    def parse_and_drop() -> None:
        for k, v in raw:
            (parse_impression if k == "imp" else parse_click)(v)

    parse_s = timed(parse_and_drop, "default")
    parse_tuned_s = timed(parse_and_drop, "tuned")
    parsed = parse(raw)

    # The parsed list and the raw bytes are benchmark artefacts a real consumer never holds;
    # freeze them out of the cyclic GC so it scans only what production would: the window.
    gc.collect()
    gc.freeze()
    secs: dict[str, float] = {}
    for mode in ("default", "tuned", "off"):
        joiner = Joiner(window_s=WINDOW_S, max_pending=2_000_000)
        sink = Sink(imp_ts)
        secs[f"join_gc_{mode}"] = timed(lambda j=joiner, s=sink: run_join(j, parsed, s), mode)
    counts = joiner.counts()
    delays = sink.delays
    pos_delays = np.array(sink.pos_delays)

    for mode in ("default", "tuned"):
        sink_e2e = Sink(imp_ts)
        secs[f"e2e_gc_{mode}"] = timed(
            lambda s=sink_e2e: run_e2e(Joiner(window_s=WINDOW_S), raw, s), mode)
        assert sink_e2e.n == sink.n
    secs["parse_gc_default"] = parse_s
    secs["parse_gc_tuned"] = parse_tuned_s

    # Checkpoint cost at the steady-state pending size: snapshot mid-stream.
    mid_joiner = Joiner(window_s=WINDOW_S)
    run_join(mid_joiner, parsed[: len(parsed) // 2], Sink(imp_ts), final=False)
    t0 = time.perf_counter()
    blob = mid_joiner.state()
    state_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    Joiner.restore(blob)
    restore_s = time.perf_counter() - t0

    def rates(sec: float) -> dict[str, float]:
        return {"shown_items_per_s": n_items / sec, "requests_per_s": n_req / sec,
                "us_per_shown_item": sec / n_items * 1e6}

    throughput = {k: rates(v) for k, v in secs.items()}
    res = {
        "benchmark": "joiner_core",
        "quick": args.quick,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "requests": n_req,
        "items_per_request": ITEMS_PER_REQUEST,
        "shown_items": n_items,
        "clicks": n_clicks,
        "click_rate_per_shown_item": CLICK_RATE,
        "window_s": WINDOW_S,
        "requests_per_event_s": REQUESTS_PER_EVENT_S,
        "impressions_per_s": {
            "shown_items_per_s": throughput["join_gc_tuned"]["shown_items_per_s"],
            "requests_per_s": throughput["join_gc_tuned"]["requests_per_s"],
            "measured": "pure join from already-parsed objects, GC thresholds "
                        f"{TUNED_GC} + gc.freeze() as recommended in docs/joiner.md; "
                        "shown_items = requests x 10",
        },
        "throughput": throughput,
        "throughput_note": "join_*: add_impression/join_click/advance on parsed objects; "
                           "e2e_*: model_validate_json of raw Kafka values + join; parse: "
                           "model_validate_json only; gc_default = CPython (700, 10, 10), "
                           f"gc_tuned = {TUNED_GC}, gc_off = disabled",
        "generate_s": gen_s,
        "join_delay_p50_s": float(np.percentile(delays, 50)),
        "join_delay_p99_s": float(np.percentile(delays, 99)),
        "positive_join_delay_p50_s": float(np.percentile(pos_delays, 50)),
        "positive_join_delay_p99_s": float(np.percentile(pos_delays, 99)),
        "join_delay_note": "event time from impression to emitted example, steady state "
                           "(end-of-stream flush excluded); negatives wait window_s plus "
                           "allowed lateness plus the advance cadence, positives only the user",
        "examples_emitted": sink.n,
        "counts": {k: getattr(counts, k) for k in counts.__slots__},
        "checkpoint": {"pending_items": mid_joiner.pending, "state_bytes": len(blob),
                       "state_s": state_s, "restore_s": restore_s},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))

    print(f"joiner_core: {n_req:,} requests x {ITEMS_PER_REQUEST} = {n_items:,} shown items, "
          f"{n_clicks:,} clicks, window {WINDOW_S:g} s")
    print(f"{'stage':<28}{'shown items/s':>15}{'requests/s':>13}{'us/item':>10}")
    for name, key in (("parse only, GC default", "parse_gc_default"),
                      ("parse only, GC tuned", "parse_gc_tuned"),
                      ("join, GC default", "join_gc_default"),
                      ("join, GC tuned", "join_gc_tuned"),
                      ("join, GC off", "join_gc_off"),
                      ("e2e raw JSON, GC default", "e2e_gc_default"),
                      ("e2e raw JSON, GC tuned", "e2e_gc_tuned")):
        t = throughput[key]
        print(f"{name:<28}{t['shown_items_per_s']:>15,.0f}{t['requests_per_s']:>13,.0f}"
              f"{t['us_per_shown_item']:>10.2f}")
    print(f"join delay p50/p99: all {res['join_delay_p50_s']:.2f}/{res['join_delay_p99_s']:.2f} s,"
          f" positives {res['positive_join_delay_p50_s']:.2f}/"
          f"{res['positive_join_delay_p99_s']:.2f} s")
    print(f"checkpoint at {mid_joiner.pending:,} pending items: {len(blob) / 1e6:.1f} MB, "
          f"state {state_s:.2f} s, restore {restore_s:.2f} s")
    print("counts:", json.dumps(res["counts"]))
    print(f"wrote {args.out}")
    assert counts.clicks_joined + counts.clicks_late + counts.clicks_duplicate \
        + counts.clicks_orphan == n_clicks


if __name__ == "__main__":
    main()
