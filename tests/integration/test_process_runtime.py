"""``freshrec trainer`` and ``freshrec joiner`` as shipped: /healthz answers once their loops
run, and every native thread pool is sized to the CPU budget they were given."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from freshrec.devstack import free_port, wait_http_ok
from freshrec.metrics import scrape
from freshrec.runtime import THREAD_ENV_VARS
from freshrec.settings import Settings
from tests.conftest import settings_env

pytestmark = pytest.mark.integration

CPU_THREADS = 1  # below this machine's core count, so the default would not pass by chance


def test_trainer_and_joiner_report_sized_pools_and_a_live_loop(settings: Settings,
                                                               tmp_path) -> None:
    ports = {"trainer": free_port(), "joiner": free_port()}
    procs = {}
    try:
        for component, port in ports.items():
            env = settings_env(settings, cpu_threads=CPU_THREADS,
                               **{f"{component}_metrics_port": port})
            for var in THREAD_ENV_VARS:
                env.pop(var, None)
            log = open(tmp_path / f"{component}.log", "wb")  # noqa: SIM115 - the child's
            procs[component] = subprocess.Popen(
                [sys.executable, "-m", "freshrec.cli", component], env=env, stdout=log,
                stderr=subprocess.STDOUT)
        for component, port in ports.items():
            wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=120)
            assert "loop beat" in httpx.get(f"http://127.0.0.1:{port}/healthz").text
            samples = scrape(f"http://127.0.0.1:{port}/metrics")
            prefix = f"freshrec_{component}_thread_pool_size{{pool="
            pools = {k[len(prefix):-1]: v for k, v in samples.items() if k.startswith(prefix)}
            assert "openblas" in pools, (component, pools)  # numpy's BLAS, in both
            assert set(pools.values()) == {CPU_THREADS}, (component, pools)
            if component == "trainer":
                assert {"openmp", "torch", "torch_interop", "numba"} <= set(pools), pools
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
