"""Embedding-table benchmark: lookup, insert, update throughput, memory per ID, dict baseline.

    .venv/bin/python bench/table.py --quick   # < 1 minute
    .venv/bin/python bench/table.py           # a few minutes, more repetitions

Prints a table and writes ``bench/results/table.json`` and ``bench/results/table_memory.png``
(rows and bytes over time under an unbounded Zipf ID stream with expiry on).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore.table import EmbeddingTable, TableConfig
from freshrec.runtime import apply_thread_budget, cpu_budget

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 65_536
LIVE = 1_000_000
DIM = 16


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class DictTable:
    """The baseline: a Python dict ID -> row into a growable numpy array of embeddings."""

    def __init__(self, dim: int) -> None:
        self.rows: dict[int, int] = {}
        self.emb = np.zeros((1024, dim), np.float32)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        get = self.rows.get
        return np.fromiter((get(i, -1) for i in ids.tolist()), np.int64, ids.size)

    def insert(self, ids: np.ndarray) -> None:
        for i in ids.tolist():
            if i not in self.rows:
                r = len(self.rows)
                if r == self.emb.shape[0]:
                    self.emb = np.concatenate([self.emb, np.zeros_like(self.emb)])
                self.rows[i] = r


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def warm_up() -> None:
    """Compile (or load from cache) every kernel, so no timing below includes numba."""
    for opt, rowwise in (("adagrad", False), ("adagrad", True)):
        t = EmbeddingTable(TableConfig("w", DIM, optimizer=opt, rowwise_adagrad=rowwise))
        rows = t.lookup(np.arange(100), 0.0)
        t.find(np.arange(100))
        t.apply_gradients(rows, np.ones((100, DIM), np.float32))
        t.sweep_expired(1e9)
        t.reserve(2000)


def measure_memory(rowwise: bool) -> tuple[int, int, float]:
    """(RSS delta, table bytes, inserts/s with growth) for LIVE IDs, in a fresh process.

    A fresh process keeps memory freed by earlier phases from being reused and hiding cost.
    """
    warm_up()
    ids = np.random.default_rng(0).choice(2**62, LIVE, replace=False).astype(np.int64)
    gc.collect()
    rss0 = rss_bytes()
    cfg = TableConfig("bench", DIM, max_rows=10 * LIVE, ttl_seconds=1e12, rowwise_adagrad=rowwise)
    table = EmbeddingTable(cfg)
    t0 = time.perf_counter()
    for i in range(0, LIVE, BATCH):
        table.lookup(ids[i : i + BATCH], 1.0)
    seconds = time.perf_counter() - t0
    return rss_bytes() - rss0, table.stats().bytes, rate(LIVE, seconds)


def in_fresh_process(rowwise: bool) -> tuple[int, int, float]:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(measure_memory, (rowwise,))


def bench_core(reps: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.choice(2**62, LIVE, replace=False).astype(np.int64)
    gc.collect()

    # 1. inserts with growth from an empty table; RSS delta and table bytes per live ID
    rss_delta, table_bytes, insert_growth = in_fresh_process(rowwise=False)
    rw_rss, rw_bytes, _ = in_fresh_process(rowwise=True)
    table = EmbeddingTable(TableConfig("bench", DIM, max_rows=10 * LIVE, ttl_seconds=1e12))
    for i in range(0, LIVE, BATCH):
        table.lookup(ids[i : i + BATCH], 1.0)
    ideal = 8 + DIM * 4 + DIM * 4  # key + embedding + per-coordinate Adagrad accumulator
    rw_ideal = 8 + DIM * 4 + 4  # key + embedding + one accumulator float

    # 2. read-only and training lookups of existing IDs, uniform over the live set
    queries = ids[rng.integers(0, LIVE, BATCH * reps)].reshape(reps, BATCH)
    t0 = time.perf_counter()
    for q in queries:
        table.find(q)
    find_rate = rate(queries.size, time.perf_counter() - t0)
    t0 = time.perf_counter()
    for q in queries:
        table.lookup(q, 2.0)
    train_lookup_rate = rate(queries.size, time.perf_counter() - t0)

    # 3. Adagrad updates (rows from find; timing covers apply_gradients only)
    grads = rng.normal(size=(BATCH, DIM)).astype(np.float32)
    row_batches = [table.find(q) for q in queries]
    t0 = time.perf_counter()
    for rows in row_batches:
        table.apply_gradients(rows, grads)
    update_rate = rate(queries.size, time.perf_counter() - t0)

    # 4. dict baseline, same queries
    base = DictTable(DIM)
    base.insert(ids)
    n_dict = min(reps, 5)
    t0 = time.perf_counter()
    for q in queries[:n_dict]:
        base.lookup(q)
    dict_rate = rate(n_dict * BATCH, time.perf_counter() - t0)
    del base, row_batches, table
    gc.collect()

    # 5. inserts into reserved (pre-faulted) capacity: the steady-state insert cost
    reserved = EmbeddingTable(TableConfig("bench", DIM, max_rows=10 * LIVE, ttl_seconds=1e12))
    reserved.reserve(LIVE)
    t0 = time.perf_counter()
    for i in range(0, LIVE, BATCH):
        reserved.lookup(ids[i : i + BATCH], 1.0)
    insert_rate = rate(LIVE, time.perf_counter() - t0)
    del reserved
    gc.collect()

    # first-touch bandwidth of fresh memory on this machine: what bounds insert-with-growth
    t0 = time.perf_counter()
    probe = np.empty(64 * 2**20 // 8, np.float64)
    probe[:] = 0.0
    fault_gb_s = 64 * 2**20 / (time.perf_counter() - t0) / 1e9
    del probe

    return {
        "live_ids": LIVE,
        "batch": BATCH,
        "dim": DIM,
        "lookup_ids_per_s": find_rate,
        "train_lookup_ids_per_s": train_lookup_rate,
        "insert_ids_per_s": insert_rate,
        "insert_with_growth_ids_per_s": insert_growth,
        "update_ids_per_s": update_rate,
        "dict_lookup_ids_per_s": dict_rate,
        "speedup_vs_dict": find_rate / dict_rate,
        "train_lookup_speedup_vs_dict": train_lookup_rate / dict_rate,
        "ideal_bytes_per_id": ideal,
        "table_bytes_per_id": table_bytes / LIVE,
        "rss_bytes_per_id": rss_delta / LIVE,
        "memory_ratio": rss_delta / LIVE / ideal,
        "memory_ratio_table_bytes": table_bytes / LIVE / ideal,
        "rowwise_adagrad": {
            "ideal_bytes_per_id": rw_ideal,
            "table_bytes_per_id": rw_bytes / LIVE,
            "rss_bytes_per_id": rw_rss / LIVE,
            "memory_ratio": rw_rss / LIVE / rw_ideal,
            "memory_ratio_table_bytes": rw_bytes / LIVE / rw_ideal,
        },
        "first_touch_gb_per_s": fault_gb_s,
    }


def bench_zipf(batches: int) -> dict:
    """Unbounded Zipf stream (new IDs forever), TTL expiry on: memory must plateau."""
    rng = np.random.default_rng(1)
    ttl, per_batch, seconds_per_batch = 120.0, 8192, 1.0
    table = EmbeddingTable(TableConfig("zipf", DIM, ttl_seconds=ttl, max_rows=10 * LIVE))
    rss0 = rss_bytes()
    series: dict[str, list[float]] = {"t": [], "rows": [], "table_mb": [], "rss_mb": []}
    for b in range(batches):
        now = b * seconds_per_batch
        ids = rng.zipf(1.15, per_batch).astype(np.int64)
        rows = table.lookup(ids, now)
        table.apply_gradients(rows, np.zeros((per_batch, DIM), np.float32))
        if b % 10 == 0:
            table.sweep_expired(now)
            # a publisher would ship changes_since(...) here; then the deletion log is trimmed
            table.trim_deletions(table.version)
            series["t"].append(now)
            series["rows"].append(len(table))
            series["table_mb"].append(table.stats().bytes / 1e6)
            series["rss_mb"].append((rss_bytes() - rss0) / 1e6)
    s = table.stats()
    return {
        "batches": batches,
        "ids_per_batch": per_batch,
        "ttl_seconds": ttl,
        "final_rows": s.rows,
        "admitted_total": s.admitted_total,
        "evicted_total": s.evicted_total,
        "rejected_total": s.rejected_total,
        "series": series,
    }


def plot(zipf: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = zipf["series"]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(s["t"], s["rows"], color="tab:blue", label="live rows")
    ax1.set_xlabel("event time (s)")
    ax1.set_ylabel("live rows", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(s["t"], s["table_mb"], color="tab:red", label="table bytes")
    ax2.plot(s["t"], s["rss_mb"], color="tab:orange", ls="--", label="RSS delta")
    ax2.set_ylabel("MB", color="tab:red")
    ax2.legend(loc="lower right")
    ax1.set_title(
        f"Zipf(1.15) stream, {zipf['ids_per_batch']} IDs/s, TTL {zipf['ttl_seconds']:.0f}s, "
        "min_count 1"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="under a minute")
    args = ap.parse_args()
    apply_thread_budget(cpu_budget())  # as freshrec's processes size their pools
    reps, zipf_batches = (20, 600) if args.quick else (100, 3000)
    warm_up()
    zipf = bench_zipf(zipf_batches)  # first, so its RSS delta starts from a clean heap
    core = bench_core(reps)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(zipf, RESULTS / "table_memory.png")
    result = {
        "mode": "quick" if args.quick else "full",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **core,
        "zipf_expiry": {k: v for k, v in zipf.items() if k != "series"},
        "notes": {
            "train_lookup_ids_per_s": "lookup() also writes last_seen and count per hit (two "
            "more random cache lines per ID) and may admit; find() is the read path.",
            "insert_with_growth_ids_per_s": "inserting into an empty table pays doubling copies "
            "and first-touch page faults for ~172 B/ID; first_touch_gb_per_s varied 0.4-6 GB/s "
            "between runs on this VM. reserve(n) moves that cost to start-up: insert_ids_per_s.",
            "rowwise_adagrad.memory_ratio": "row-wise Adagrad shrinks the ideal to 76 B/ID, but "
            "per-row metadata stays: ID 8 + last_seen float64 8 + version int64 8 + count int32 4 "
            "+ index ~8.4 (int32 slots at load 0.48) = ~36 B, so the ratio is ~1.43; absolute "
            "bytes/ID fall from ~169 to ~108.",
        },
        "targets": {
            "lookup_ids_per_s": 20e6,
            "insert_ids_per_s": 5e6,
            "memory_ratio": 1.3,
            "speedup_vs_dict": 10.0,
        },
    }
    (RESULTS / "table.json").write_text(json.dumps(result, indent=2))
    rows = [
        ("find (read-only) lookups/s", f"{core['lookup_ids_per_s'] / 1e6:8.1f} M"),
        ("training lookup/s", f"{core['train_lookup_ids_per_s'] / 1e6:8.1f} M"),
        ("inserts/s (reserved)", f"{core['insert_ids_per_s'] / 1e6:8.1f} M"),
        ("inserts/s (with growth)", f"{core['insert_with_growth_ids_per_s'] / 1e6:8.1f} M"),
        ("Adagrad updates/s", f"{core['update_ids_per_s'] / 1e6:8.1f} M"),
        ("dict lookups/s", f"{core['dict_lookup_ids_per_s'] / 1e6:8.1f} M"),
        ("speedup vs dict", f"{core['speedup_vs_dict']:8.1f} x"),
        ("bytes/ID (RSS, table)",
         f"{core['rss_bytes_per_id']:.0f}, {core['table_bytes_per_id']:.0f}"),
        ("memory ratio (RSS, table)",
         f"{core['memory_ratio']:.2f}, {core['memory_ratio_table_bytes']:.2f}"),
        ("row-wise ratio (RSS, table)",
         f"{core['rowwise_adagrad']['memory_ratio']:.2f}, "
         f"{core['rowwise_adagrad']['memory_ratio_table_bytes']:.2f}"),
        ("first-touch memory GB/s", f"{core['first_touch_gb_per_s']:8.2f}"),
        ("zipf final rows", f"{zipf['final_rows']}"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
