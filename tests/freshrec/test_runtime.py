"""Thread budgets from cgroup files and settings, and the pools a process really gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freshrec.runtime import (
    THREAD_ENV_VARS,
    cgroup_cpu_limit,
    cpu_budget,
    owns_cpus,
    usable_cpus,
    worker_cpu_sets,
)

ROOT = Path(__file__).resolve().parents[2]


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path


def test_cgroup_v2_quota_is_read_in_cpus(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_cgroup(tmp_path, {"cpu.max": "150000 100000"})) == 1.5


def test_cgroup_v2_without_quota_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(_cgroup(tmp_path, {"cpu.max": "max 100000"})) is None


@pytest.mark.parametrize("controller", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_cfs_quota_is_read_in_cpus(tmp_path: Path, controller: str) -> None:
    root = _cgroup(tmp_path, {f"{controller}/cpu.cfs_quota_us": "300000",
                              f"{controller}/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root) == 3.0


def test_cgroup_v1_minus_one_is_no_limit(tmp_path: Path) -> None:
    root = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit(root) is None


def test_workers_get_disjoint_cpu_sets_covering_the_mask() -> None:
    assert worker_cpu_sets([0, 1], 2) == [{0}, {1}]
    assert worker_cpu_sets([2, 3, 5, 7, 8], 2) == [{2, 5, 8}, {3, 7}]
    assert worker_cpu_sets([4], 1) == [{4}]
    with pytest.raises(ValueError, match="3 workers"):
        worker_cpu_sets([0, 1], 3)


def test_a_process_owns_its_cpus_only_without_a_budget_below_them(tmp_path: Path) -> None:
    cpus = usable_cpus()
    unlimited = _cgroup(tmp_path / "none", {"cpu.max": "max 100000"})
    assert owns_cpus(None, unlimited)
    # a quota below the mask: a share of a node's CPUs, not CPUs of its own
    assert not owns_cpus(None, _cgroup(tmp_path / "quota", {"cpu.max": f"{cpus * 50000} 100000"}))
    assert owns_cpus(cpus, unlimited)  # a configured budget as large as the mask
    if cpus > 1:
        assert not owns_cpus(cpus - 1, unlimited)


def test_budget_is_the_setting_else_the_quota_rounded_down_else_the_cpus(tmp_path: Path) -> None:
    assert cpu_budget(3, root=tmp_path) == 3
    assert cpu_budget(None, root=tmp_path) == usable_cpus()  # no cgroup files: no quota
    half = _cgroup(tmp_path / "half", {"cpu.max": "50000 100000"})
    assert cpu_budget(None, root=half) == 1  # never zero
    one_and_half = _cgroup(tmp_path / "1.5", {"cpu.max": "150000 100000"})
    assert cpu_budget(None, root=one_and_half) == 1
    huge = _cgroup(tmp_path / "huge", {"cpu.max": "6400000 100000"})
    assert cpu_budget(None, root=huge) == usable_cpus()  # capped by the CPUs it may use


_REPORT = """
import json, sys
from freshrec.runtime import apply_thread_budget, thread_pools
apply_thread_budget(int(sys.argv[1]))  # the CLI, before the component's imports
import numpy, torch, numba
numpy.ones((64, 64)) @ numpy.ones((64, 64))
apply_thread_budget(int(sys.argv[1]))  # the component's run(): torch's inter-op pool too
print(json.dumps(thread_pools()))
"""


@pytest.mark.parametrize("threads", [1, 3])
def test_every_native_pool_of_a_fresh_process_gets_the_budget(threads: int) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in THREAD_ENV_VARS and not k.startswith("FRESHREC_")}
    out = subprocess.run([sys.executable, "-c", _REPORT, str(threads)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    pools = json.loads(out.splitlines()[-1])
    assert {"openblas", "openmp", "torch", "torch_interop", "numba"} <= set(pools)
    assert set(pools.values()) == {threads}, pools
