"""Serving benchmark: 100-candidate /v1/score requests at a sweep of request rates.

    .venv/bin/python bench/serve.py --quick   # < 2 minutes
    .venv/bin/python bench/serve.py           # longer levels, more rates

Starts its own Redis + broker (LocalStack), publishes a synthetic snapshot (20 k items, 5 k users,
the MovieLens model config) with the real Publisher, starts ``freshrec service`` as a child
process exactly as a user does (shipped defaults, ``WEB_CONCURRENCY=--workers``, no thread
variables: each worker sizes its own pools, and their sizes are recorded) and drives it
with ``wrk`` (Debian package) on the same machine. Requests follow one Poisson arrival process
at the level's rate (open loop): the Lua ``delay()`` gives each connection that becomes free the
next arrival time of that process (read from the monotonic clock through LuaJIT's FFI), so a
response's latency does not push later arrivals back. (Before, each connection waited an
exponential gap *after* each response, so the achieved rate fell short of the offered one by
latency / gap: 5-6 % at 1,000 req/s, nothing to do with the service keeping up.) One connection
per ~10 req/s caps concurrency: when all are busy, arrivals wait for a free one and the schedule
catches up, so wrk is still not coordinated-omission free and tails at overloaded levels are
under-stated; a level only "holds" if it achieved >= 95 % of the offered rate with p99 <= the
SLO. Per level the service's CPU time (all its processes, user + system)
per request is recorded (``service_cpu_ms_per_req``). Beside it, in the same run, the in-process
cost of the same request: featurize + gather + pool + forward + bonus (``score_ms``), the dense
forward as served (numpy, ``model_forward_ms``) and through torch (``model_forward_torch_ms``).

The sweep repeats one request body (one user, the same 100 candidates), which keeps their rows in
the CPU's caches; after it, ``varied_bodies`` runs 500 and 1,000 req/s with each request drawn
from 512 bodies (other users and candidate sets), the cost of traffic that spreads over the
catalogue.

Writes ``bench/results/serve.json`` and ``bench/results/serve.png`` (``--name`` for another name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import redis
import torch

from bandit.clusters import OnlineKMeans
from bandit.context import user_tower
from bandit.diag_linucb import DiagLinUCB
from bench import require_shipped_extras
from featurestore.featurize import Featurizer, encode_value
from featurestore.schema import SlotSide, load_model_config
from featurestore.snapshot_writer import SnapshotStore
from featurestore.table import TableSet
from freshrec.devstack import LocalStack, free_port
from freshrec.metrics import scrape
from freshrec.runtime import THREAD_ENV_VARS, apply_thread_budget, cpu_budget
from freshrec.settings import Settings, default_model_config_path
from service.scoring import Scorer
from service.snapshot import ServingSnapshot, torch_threads
from trainer.model import CTRModel
from trainer.publisher import PublishableState, Publisher

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "bench-serve"
N_USERS, N_ITEMS, N_CANDIDATES = 5_000, 20_000, 100
GENRES = ["Action", "Adventure", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller"]

LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- BODY_FILE: one JSON body per line; with several, each request picks one at random
local reqs = {}
for line in io.lines(os.getenv("BODY_FILE")) do
  reqs[#reqs + 1] = wrk.format(nil, nil, nil, line)
end
wrk.body = nil
function request() return reqs[math.random(#reqs)] end
local mean_ms = tonumber(os.getenv("MEAN_GAP_MS"))  -- between arrivals, whole thread
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local clock = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, clock)  -- CLOCK_MONOTONIC
  return tonumber(clock.tv_sec) * 1000 + tonumber(clock.tv_nsec) / 1e6
end
math.randomseed(os.time())
local next_ms = nil
function delay()  -- a free connection sends at the next arrival of one Poisson process
  local t = now_ms()
  next_ms = (next_ms or t) - math.log(1 - math.random()) * mean_ms
  return math.max(0, math.floor(next_ms - t))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def user_features(i: int) -> dict:
    return {"age": 18 + i % 50, "gender": "MF"[i % 2], "occupation": f"occ{i % 21}",
            "zip_prefix": f"{i % 90:02d}"}


def item_features(j: int) -> dict:
    return {"genres": [GENRES[j % 8], GENRES[(j // 8) % 8]], "release_year": 1940 + j % 60}


def build_state(settings: Settings) -> PublishableState:
    """A trained-looking state: every user/item admitted, random rows, bandit stats, clusters."""
    config = load_model_config(settings.model_config_path)
    torch.manual_seed(0)
    tables = TableSet.from_model_config(config)
    feats = Featurizer(config)
    rng = np.random.default_rng(0)
    users = rng.integers(N_USERS, size=N_ITEMS * 2)
    recs = [{**user_features(int(u)), **item_features(j % N_ITEMS), "user_id": f"u{u}",
             "item_id": f"m{j % N_ITEMS}"} for j, u in enumerate(users)]
    batch = feats.featurize(recs)
    for name, table in tables.items():
        for _ in range(2):  # zip has min_count 2
            table.lookup(batch.slots[name].ids, 1.0)
    # Centroids over the user tower (every user-side slot pooled), the vector the trainer
    # clusters and the service places users with: centroids of another width give no context,
    # and the benchmark would measure serving without the exploration bonus.
    user_recs = [user_features(u) | {"user_id": f"u{u}"} for u in range(N_USERS)]

    def lookup(slot: str, ids: np.ndarray) -> np.ndarray:
        return tables[slot].gather(tables[slot].find(ids))

    towers = user_tower(config, feats.featurize(user_recs, SlotSide.USER), lookup)
    km = OnlineKMeans(settings.bandit_clusters, towers.shape[1])
    km.partial_fit(towers)
    bandit = DiagLinUCB(settings.bandit_clusters)
    n = 50_000
    items = np.array([encode_value(f"m{j}") for j in rng.integers(N_ITEMS, size=n)])
    cl = rng.integers(settings.bandit_clusters, size=(n, 3))
    bandit.update(items, cl, np.full((n, 3), 1 / 3), (rng.random(n) < 0.1).astype(float), 1.0)
    return PublishableState(config, tables, CTRModel(config), bandit,
                            lambda: (km.centroids, km.counts))


def request_body(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    u = int(rng.integers(N_USERS))
    cands = rng.choice(N_ITEMS, size=N_CANDIDATES, replace=False)
    return {"user_id": f"u{u}", "features": user_features(u), "top_k": 20, "explore": True,
            "candidates": [{"item_id": f"m{j}", "features": item_features(int(j))}
                           for j in cands]}


def in_process_costs(store: SnapshotStore, settings: Settings, body: dict, reps: int) -> dict:
    """Median ms of the whole scoring function and of the bare forward, same snapshot."""
    config = load_model_config(settings.model_config_path)
    torch_threads()  # as a serving worker runs it
    snap = ServingSnapshot.from_full(store.read_full(), config)
    scorer = Scorer(config, alpha=settings.bandit_alpha, top_k_clusters=settings.bandit_top_k)
    items = [(c["item_id"], c["features"]) for c in body["candidates"]]
    x = scorer.features(snap, body["user_id"], body["features"], items)
    if scorer.score(snap, body["user_id"], body["features"], items, 20, True).context is None:
        raise RuntimeError("the snapshot gives no exploration context: the benchmark would "
                           "measure scoring without the bonus")

    def timeit(fn) -> float:
        for _ in range(20):
            fn()
        t = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            t.append(time.perf_counter() - s)
        return float(np.median(t) * 1e3)

    return {
        "model_forward_ms": timeit(lambda: scorer.forward(snap, x)),
        "model_forward_torch_ms": timeit(lambda: scorer.forward_torch(snap, x)),
        "features_ms": timeit(lambda: scorer.features(snap, body["user_id"], body["features"],
                                                      items)),
        "score_ms": timeit(lambda: scorer.score(snap, body["user_id"], body["features"], items,
                                                20, True)),
    }


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its children (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo += [int(c) for c in
                     Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def start_stack(tmp: Path) -> tuple[LocalStack, Settings]:
    """A broker + Redis of the benchmark's own, and settings for a service on a free port."""
    stack = LocalStack(topics=("bench.events", "bench.impressions"), partitions=2,
                       log_dir=tmp / "logs")
    stack.start()
    settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                        model_name=MODEL, topic_events="bench.events",
                        topic_impressions="bench.impressions", service_port=free_port(),
                        model_config_path=default_model_config_path())
    return stack, settings


def run_wrk(url: str, rate: int, seconds: float, body_file: Path, lua: Path,
            service_pid: int | None = None) -> dict:
    # Arrivals at ``rate`` whatever the latency (see LUA); the connections cap concurrency.
    conns = max(8, rate // 10)
    cpu0 = process_tree_cpu_s(service_pid) if service_pid else 0.0
    env = dict(os.environ, BODY_FILE=str(body_file), MEAN_GAP_MS=str(1000.0 / rate))
    proc = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "2s",
                           "-s", str(lua), url], env=env, capture_output=True, text=True,
                          timeout=seconds + 60)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    r = json.loads(line[len("RESULT "):])
    dur = r["duration_us"] / 1e6
    cpu = process_tree_cpu_s(service_pid) - cpu0 if service_pid else float("nan")
    return {"offered_rps": rate, "connections": conns, "rps": r["requests"] / dur,
            "p50_ms": r["p50_us"] / 1e3, "p95_ms": r["p95_us"] / 1e3,
            "p99_ms": r["p99_us"] / 1e3, "max_ms": r["max_us"] / 1e3,
            "errors": r["socket_errors"] + r["status_errors"] + r["timeouts"],
            "service_cpu_ms_per_req": round(1e3 * cpu / max(r["requests"], 1), 3),
            "loadavg_1m": os.getloadavg()[0]}


def start_service(stack: LocalStack, port: int, workers: int, name: str = "service",
                  extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``freshrec service`` as a user starts it: the shipped defaults, ``WEB_CONCURRENCY``
    workers, and no thread variables (the service sizes its own pools, freshrec/runtime.py).
    ``extra_env`` departs from that on purpose (bench/serve_budget.py's comparisons)."""
    env = {k: v for k, v in stack.env().items() if k not in THREAD_ENV_VARS}
    env |= {f"FRESHREC_{k.upper()}": str(v) for k, v in {
        "model_name": MODEL, "topic_events": "bench.events",
        "topic_impressions": "bench.impressions", "service_port": port}.items()}
    env["WEB_CONCURRENCY"] = str(workers)
    env |= extra_env or {}
    return stack.spawn_component(name, "service", env=env)


def wait_ready(stack: LocalStack, url: str, workers: int, timeout: float = 60.0) -> None:
    """Every worker loads its own snapshot and each new connection may land on any of them:
    wait for a run of ready answers, not the first one."""
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < 10 * workers:
        try:
            ok = httpx.get(f"{url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            ok = False
        ready = ready + 1 if ok else 0
        if time.monotonic() > deadline or stack.check_children():
            raise RuntimeError(f"service did not become ready: {stack.check_children()}")
        time.sleep(0.02 if ok else 0.2)


def service_thread_pools(url: str) -> dict[str, dict[str, float]]:
    """Each worker's thread pools as it reports them in /metrics (by pid)."""
    pools: dict[str, dict[str, float]] = {}
    for key, value in scrape(f"{url}/metrics").items():
        if key.startswith("freshrec_service_thread_pool_size{"):
            labels = dict(kv.split("=", 1) for kv in key[key.index("{") + 1:-1].split(","))
            pools.setdefault(labels.get("pid", "0"), {})[labels["pool"]] = value
    return pools


def rate_sweep(url: str, rates: list[int], seconds: float, body_file: Path, lua: Path,
               service_pid: int, slo_ms: float) -> list[dict]:
    """One wrk level per offered rate; a level holds at >= 95 % of the rate, p99 <= SLO."""
    levels = []
    print(f"{'offered':>8} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8} {'errors':>6} {'cpu ms/req':>10} {'load':>5}")
    for rate in rates:
        lv = run_wrk(f"{url}/v1/score", rate, seconds, body_file, lua, service_pid)
        lv["held"] = bool(lv["p99_ms"] <= slo_ms and lv["rps"] >= 0.95 * rate
                          and lv["errors"] == 0)
        levels.append(lv)
        print(f"{rate:>8} {lv['rps']:>8.0f} {lv['p50_ms']:>8.2f} {lv['p95_ms']:>8.2f} "
              f"{lv['p99_ms']:>8.2f} {lv['max_ms']:>8.1f} {lv['errors']:>6}"
              f" {lv['service_cpu_ms_per_req']:>10.2f} {lv['loadavg_1m']:>5.1f}"
              f"{'' if lv['held'] else '  (not held)'}")
    return levels


VARIED_BODIES, VARIED_RATES = 512, (500, 1000)


def varied_bodies(url: str, tmp: Path, lua: Path, seconds: float, service_pid: int,
                  slo_ms: float) -> dict:
    """The same levels with requests drawn from many bodies (users and candidate sets).

    The sweep repeats one body: the same user and 100 candidates every time, so their rows,
    statistics and memo entries stay in the CPU's caches. Real traffic spreads over users and
    the catalogue; this measures the cost of that (every body is seen in the warm-up first, so
    the memos are as warm as in a long-running replica and only the caches differ).
    """
    many = tmp / "bodies.jsonl"
    many.write_text("\n".join(json.dumps(request_body(seed))
                              for seed in range(1, VARIED_BODIES + 1)) + "\n")
    run_wrk(f"{url}/v1/score", 300, 6, many, lua)  # warm-up: ~1,800 draws of 512 bodies
    print(f"{VARIED_BODIES} distinct bodies, each request picks one at random:")
    levels = rate_sweep(url, list(VARIED_RATES), seconds, many, lua, service_pid, slo_ms)
    return {"bodies": VARIED_BODIES, "levels": levels}


def best_level(levels: list[dict]) -> dict:
    """The highest rate held; if none held, the level with the lowest p99."""
    held = [lv for lv in levels if lv["held"]]
    return max(held, key=lambda lv: lv["rps"]) if held else min(levels,
                                                                 key=lambda lv: lv["p99_ms"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short levels (< 2 minutes)")
    ap.add_argument("--workers", type=int, default=2, help="service worker processes")
    ap.add_argument("--rates", type=str, default=None, help="comma-separated req/s levels")
    ap.add_argument("--name", default="serve", help="results file name (bench/results/NAME.json)")
    ap.add_argument("--reload", action="store_true", help="then the reload phase (serve_reload)")
    args = ap.parse_args()
    require_shipped_extras()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    rates = ([int(r) for r in args.rates.split(",")] if args.rates else
             [250, 500, 1000, 1250, 1500, 2000] if args.quick else
             [250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500])
    seconds = 8 if args.quick else 20
    slo_ms = Settings().service_slo_seconds * 1e3
    loadavg_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    stack, settings = start_stack(tmp)
    try:
        port = settings.service_port
        # This process measures one worker's in-process cost: it gets one worker's share.
        apply_thread_budget(max(1, cpu_budget(settings.cpu_threads) // args.workers))
        store = SnapshotStore(redis.Redis.from_url(stack.redis_url), MODEL)
        started = time.perf_counter()
        state = build_state(settings)
        pub = Publisher(store, state, settings)
        t0 = time.perf_counter()
        pub.publish_full()
        full_publish_s = time.perf_counter() - t0
        rows = sum(len(t) for t in state.tables.values())
        print(f"state built in {t0 - started:.1f}s; full publish of {rows} rows "
              f"in {full_publish_s * 1e3:.0f} ms")
        body = request_body()
        costs = in_process_costs(store, settings, body, reps=300 if args.quick else 1000)
        print("in-process: " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()))

        service = start_service(stack, port, args.workers)
        url = f"http://127.0.0.1:{port}"
        wait_ready(stack, url, args.workers)
        pools = service_thread_pools(url)
        print(f"service thread pools by worker pid: {pools}")
        body_file, lua = tmp / "body.json", tmp / "post.lua"
        body_file.write_text(json.dumps(body))
        lua.write_text(LUA)
        resp = httpx.post(f"{url}/v1/score", json=body, timeout=5)
        assert resp.status_code == 200, resp.text
        run_wrk(f"{url}/v1/score", 200, 2, body_file, lua)  # warm-up
        levels = rate_sweep(url, rates, seconds, body_file, lua, service.pid, slo_ms)
        best = best_level(levels)
        varied = varied_bodies(url, tmp, lua, seconds, service.pid, slo_ms)
        result = {
            "rps": round(best["rps"], 1), "p50_ms": best["p50_ms"], "p95_ms": best["p95_ms"],
            "p99_ms": best["p99_ms"], "held": best["held"], "slo_ms": slo_ms,
            **{k: round(v, 4) for k, v in costs.items()},
            "candidates": N_CANDIDATES, "workers": args.workers, "levels": levels,
            "service_thread_pools": pools, "varied_bodies": varied,
            "full_publish_ms": round(full_publish_s * 1e3, 1), "snapshot_rows": rows,
            "load_generator": "wrk -t1 on the same 2 cores as the service, broker and Redis; "
                              "Poisson arrivals at each level's rate (open loop, concurrency "
                              "capped at rate / 10)",
            "service_started_as": f"freshrec service, WEB_CONCURRENCY={args.workers}, shipped "
                                  "defaults, no thread variables in its environment",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "quick": args.quick,
            "loadavg_before": loadavg_before,
            "loadavg_after": os.getloadavg(),
            "note": "the VM is shared with other benchmarks/tests; loadavg shows contention",
        }
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{args.name}.json"
        if path.exists():  # keep the reload phase's keys (bench/serve_reload.py)
            old = json.loads(path.read_text())
            result |= {k: v for k, v in old.items() if k.startswith("reload")}
        path.write_text(json.dumps(result, indent=1))
        plot(levels, slo_ms, RESULTS / f"{args.name}.png", args.workers)
        print(f"highest level held: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
              f"p99 {result['p99_ms']:.2f} ms (bare forward {costs['model_forward_ms']:.3f} ms)")
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.reload:
        from bench.results_file import merge_into
        from bench.serve_reload import reload_phase

        merge_into(RESULTS / f"{args.name}.json", reload_phase(workers=args.workers))
    return 0


def plot(levels: list[dict], slo_ms: float, path: Path, workers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    x = [lv["offered_rps"] for lv in levels]
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        ax.plot(x, [lv[key] for lv in levels], style, label=key.replace("_ms", ""))
    ax.axhline(slo_ms, color="grey", ls="--", label=f"SLO {slo_ms:.0f} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered requests/s (100 candidates each)")
    ax.set_ylabel("latency ms")
    ax.set_title(f"/v1/score latency, {workers} uvicorn worker(s), 2-core VM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
