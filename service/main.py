"""``freshrec service``: run the scoring service under uvicorn.

One worker per CPU of the process' budget by default (see ``service_workers``);
``WEB_CONCURRENCY=N`` (uvicorn's usual variable) sets N worker processes on one port instead;
each loads its own snapshot and follows the stream. They share one /metrics through
prometheus_client's multiprocess mode: a fresh directory per start (``PROMETHEUS_MULTIPROC_DIR``
if set, emptied first; else a temporary one, removed at exit).

Thread budget: the process' CPU budget (``FRESHREC_CPU_THREADS``, else the cgroup quota, else
the CPUs it may run on) is divided among the workers, and every worker's BLAS/OpenMP/torch pools
are sized to its share before numpy or torch load (``freshrec.runtime``). Unsized, two workers
on two cores each ran two BLAS threads: 150 req/s at p99 249 ms instead of 1,600 at 13 ms.

Several workers each bind their own ``SO_REUSEPORT`` socket rather than sharing one listening
socket as ``uvicorn --workers`` does: with a shared socket the worker that happens to be awake
accepts a whole burst of keep-alive connections, and under load one worker ran at 92 % CPU while
the other idled. With one socket per worker the kernel spreads connections by hash.

Pinning (``service_pin_workers``): where the process runs one worker per CPU it owns, each
worker runs on its own (:func:`worker_cpus`). A floating worker is moved between cores by the
scheduler as the other worker, the load balancer's connections, the Kafka client's threads and
the broker wake up; each move refills its caches, which shows in the tail more than in the mean.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import uvicorn
from fastapi import FastAPI

from freshrec.runtime import (
    allowed_cpus,
    apply_thread_budget,
    cpu_budget,
    owns_cpus,
    worker_cpu_sets,
)
from freshrec.settings import Settings, load_settings

if TYPE_CHECKING:
    from service.state import ServiceState

log = logging.getLogger("freshrec.service")


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def app_from_env() -> FastAPI:
    """Factory for worker processes: settings from the ``FRESHREC_*`` environment."""
    return _serving_app(load_settings())


def _serving_app(settings: Settings) -> FastAPI:
    """The app one serving process runs, its thread pools reported in its metrics."""
    from freshrec.metrics import ServiceMetrics, report_thread_pools
    from freshrec.runtime import thread_pools
    from service.app import create_app
    from service.snapshot import torch_threads

    metrics = ServiceMetrics(slo_seconds=settings.service_slo_seconds)
    apply_thread_budget(worker_threads(settings))  # now torch is loaded: its inter-op pool too
    torch_threads()  # as the app's lifespan sets it, so the report shows what will serve
    report_thread_pools(metrics.threads, thread_pools())
    app = create_app(settings, metrics=metrics, when_loaded=_warm_up_and_freeze)
    _freeze_heap()
    return app


def _freeze_heap() -> None:
    """Move everything allocated so far out of the garbage collector's reach.

    Imports and the app (torch, pydantic, FastAPI: ~200 k tracked objects) live as long as the
    process; left in the collected generations, every full collection walks them — ~90 ms
    during which the worker answers nothing (the 100+ ms max latencies of the benchmark).
    Done per serving process, not in ``create_app``: tests build many apps in one process.
    Frozen objects are still freed by reference counting when dropped (a replaced snapshot
    holds no reference cycle: ``tests/service/test_snapshot_warmup.py``).
    """
    gc.collect()
    gc.freeze()


WARM_UP_ID = "\x00freshrec-warm-up"  # scoring only reads: even a client's ID alike is harmless


def _warm_up_and_freeze(state: ServiceState) -> None:
    """On the first snapshot: score one request, then freeze the heap again.

    What the lifespan (Redis and Kafka clients, the follower, the first snapshot) and a first
    request (numba kernels loaded from their cache, modules imported on first use) allocate
    comes after the start-up freeze: ~67 k long-lived objects, which the first full collection
    walked for 40-130 ms per worker, under load, in the middle of serving. Scoring one request
    here moves that work and those objects before readiness, and the freeze takes them out of
    every later collection. The request is scored, not served: nothing is logged to Kafka.
    """
    from service.schemas import parse_score_body

    snap = state.snapshot
    if snap is not None:
        req = parse_score_body(orjson.dumps({"user_id": WARM_UP_ID,
                                             "candidates": [{"item_id": WARM_UP_ID}]}),
                               state.scorer.candidates)
        state.scorer.score(snap, WARM_UP_ID, {}, req.items, 1, True, req.rows)
    _freeze_heap()


def _fast_loop() -> dict[str, str]:
    """uvloop + httptools when installed (about 1.5-2x the requests/s of asyncio + h11)."""
    opts = {}
    if importlib.util.find_spec("uvloop"):
        opts["loop"] = "uvloop"
    if importlib.util.find_spec("httptools"):
        # httptools, each response written in one socket call (service/http.py)
        opts["http"] = "service.http:CoalescingHttpToolsProtocol"
    return opts


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket that other workers may bind to the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _worker(host: str, port: int, opts: dict[str, Any], cpus: set[int] | None = None) -> None:
    """One worker process: its own socket, its own app (settings from the environment), on
    ``cpus`` if given (before any thread starts, so its threads run there too).

    It goes when the parent goes: a parent killed hard (an orchestrator's SIGKILL after the
    grace period) left workers serving on the port for minutes.
    """
    from freshrec.devstack import die_with_parent

    die_with_parent()
    if cpus:
        os.sched_setaffinity(0, cpus)
    sock = reuseport_socket(host, port)
    config = uvicorn.Config("service.main:app_from_env", factory=True, **opts)
    uvicorn.Server(config).run(sockets=[sock])


def worker_cpus(settings: Settings, workers: int) -> list[set[int]] | None:
    """Each worker's CPUs, or None to leave placement to the scheduler (``service_pin_workers``)."""
    pin = settings.service_pin_workers
    cpus = allowed_cpus()
    if workers < 2 or workers > len(cpus) or pin is False:
        return None
    # Unset: only one worker per CPU of a mask the process owns. A container without a CPU
    # limit sees the node's whole shared pool as its mask: that is not one CPU per worker.
    if pin is None and (workers != len(cpus) or not owns_cpus(settings.cpu_threads)):
        return None
    return worker_cpu_sets(cpus, workers)


def run_workers(n: int, host: str, port: int, opts: dict[str, Any],
                cpus: list[set[int]] | None = None) -> int:
    """Run ``n`` SO_REUSEPORT workers until SIGINT/SIGTERM or until one of them dies; worker i
    on ``cpus[i]`` when given.

    A dead worker stops the whole group (exit code 1) rather than being restarted, so the
    orchestrator sees the failure; SIGTERM is forwarded and each worker shuts down gracefully.
    """
    ctx = multiprocessing.get_context("spawn")  # torch and librdkafka threads do not fork well
    procs = [ctx.Process(target=_worker, args=(host, port, opts, cpus[i] if cpus else None),
                         name=f"service-{i}") for i in range(n)]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        while not stop.is_set() and all(p.is_alive() for p in procs):
            stop.wait(0.5)
        code = 0 if stop.is_set() else 1
        if code:
            log.error("a worker exited (%s); stopping the others",
                      [p.exitcode for p in procs])
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def multiprocess_metrics_dir() -> Iterator[Path]:
    """A clean ``PROMETHEUS_MULTIPROC_DIR`` for this start, exported to the workers.

    Set before any worker imports prometheus_client (it picks its value store at import).
    Values left by an earlier start would be summed into this one's, so an operator-given
    directory is emptied first; a temporary one is removed at exit.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        # In memory where the system has it (k8s mounts a Memory emptyDir): every metric
        # update writes to an mmap of these files, and on a disk that is a stream of dirty
        # pages for the kernel to write back.
        shm = Path("/dev/shm")
        memory = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        directory = Path(tempfile.mkdtemp(prefix="freshrec-metrics-", dir=memory))
        os.environ[MULTIPROC_ENV] = str(directory)
    try:
        yield directory
    finally:
        if not given:
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(directory, ignore_errors=True)


def service_workers(settings: Settings) -> int:
    """Worker processes to run: ``WEB_CONCURRENCY`` (uvicorn's convention), else one per CPU of
    the budget.

    Why one per CPU by default: a request's matrix work (100 candidates x a few dozen dims) is
    far too small to gain from BLAS threads, while the Python around it holds the GIL; the
    measured way to use two cores is two single-threaded workers (docs/serving.md).
    """
    configured = os.environ.get("WEB_CONCURRENCY")
    if configured:
        return max(1, int(configured))
    return cpu_budget(settings.cpu_threads)


def worker_threads(settings: Settings) -> int:
    """Threads per native pool in each worker: the process' CPU budget shared by the workers."""
    return max(1, cpu_budget(settings.cpu_threads) // service_workers(settings))


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workers = service_workers(settings)
    # Each worker's share, exported before numpy/torch load here or in the spawned workers.
    share = worker_threads(settings)
    apply_thread_budget(share)
    log.info("%d worker(s), %d thread(s) per native pool in each", workers, share)
    # No proxy-header rewriting: nothing reads the client address, and uvicorn's middleware
    # for it runs on every request.
    common = dict(host=settings.service_host, port=settings.service_port, log_level="warning",
                  access_log=False, proxy_headers=False, **_fast_loop())
    # Shared metrics for several workers, or in the directory an operator named (which may hold
    # a previous start's files: k8s keeps an emptyDir across container restarts).
    shared = workers > 1 or bool(os.environ.get(MULTIPROC_ENV))
    with multiprocess_metrics_dir() if shared else nullcontext():
        if workers == 1:
            uvicorn.run(_serving_app(settings), **common)
            return 0
        if hasattr(socket, "SO_REUSEPORT"):
            cpus = worker_cpus(settings, workers)
            if cpus:
                log.info("worker i on CPUs %s[i]", [sorted(c) for c in cpus])
            else:
                log.info("workers not pinned (service_pin_workers=%s, CPUs %s)",
                         settings.service_pin_workers, allowed_cpus())
            return run_workers(workers, settings.service_host, settings.service_port, common,
                               cpus)
        uvicorn.run("service.main:app_from_env", factory=True, workers=workers, **common)
        return 0
