"""``freshrec service`` with two workers, as shipped: one /metrics scrape covers both workers,
and each worker's native thread pools are sized to its share of the CPU budget."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from freshrec.devstack import free_port, wait_http_ok
from freshrec.runtime import THREAD_ENV_VARS, allowed_cpus, worker_cpu_sets
from freshrec.settings import Settings
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

WORKERS = 2
CPU_THREADS = 4  # two per worker: distinguishable from the one thread a 2-core machine gives


@pytest.fixture
def service(settings: Settings, tmp_path) -> Iterator[str]:
    port = free_port()
    env = settings_env(settings, service_port=port, cpu_threads=CPU_THREADS)
    for var in THREAD_ENV_VARS:
        env.pop(var, None)
    env["WEB_CONCURRENCY"] = str(WORKERS)
    log = open(tmp_path / "service.log", "wb")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen([sys.executable, "-m", "freshrec.cli", "service"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/healthz", timeout=90)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def test_one_scrape_covers_every_worker_and_each_sizes_its_pools(service: str) -> None:
    n = 60
    for _ in range(n):  # a new connection each: the kernel spreads them over both sockets
        assert httpx.get(f"{service}/v1/model").status_code == 200
    text = httpx.get(f"{service}/metrics").text
    counted = [v for labels, v in _samples(text, "freshrec_service_responses_total")
               if labels == {"route": "/v1/model", "status": "200"}]
    assert counted == [n]

    pools: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in _samples(text, "freshrec_service_thread_pool_size"):
        pools[labels["pid"]][labels["pool"]] = value
    assert len(pools) == WORKERS  # both workers wrote into the one exposition
    share = CPU_THREADS // WORKERS
    for worker in pools.values():
        assert worker["openblas"] == worker["torch_interop"] == share, worker
        assert worker.get("numba", share) == share, worker  # loaded only if something uses it
        # The service runs torch's intra-op pool (OpenMP) with one thread on purpose (small
        # concurrent requests, service/snapshot.py); its forward pass is numpy (BLAS above).
        assert worker["torch"] == worker["openmp"] == 1, worker
    # One worker per CPU, with a budget (4) that covers them: each worker runs on its own
    # (service_pin_workers unset); with more or fewer CPUs than workers they float.
    cpus = allowed_cpus()
    placed = sorted(sorted(os.sched_getaffinity(int(pid))) for pid in pools)
    if len(cpus) == WORKERS:
        assert placed == sorted(sorted(c) for c in worker_cpu_sets(cpus, WORKERS))
    else:
        assert placed == [cpus] * WORKERS



def test_each_start_gets_a_clean_metrics_directory(tmp_path, monkeypatch) -> None:
    from service.main import MULTIPROC_ENV, multiprocess_metrics_dir

    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"a previous start's values")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    with multiprocess_metrics_dir() as directory:
        assert directory == given and not list(given.iterdir())
    monkeypatch.delenv(MULTIPROC_ENV)
    with multiprocess_metrics_dir() as directory:
        assert os.environ[MULTIPROC_ENV] == str(directory) and directory.is_dir()
    assert MULTIPROC_ENV not in os.environ and not directory.exists()
