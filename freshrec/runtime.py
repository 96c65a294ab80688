"""Process-level tuning shared by the long-running components: thread budgets and the collector.

Thread budgets. numpy's OpenBLAS, torch's OpenMP pool and numba each start as many threads as
the machine has cores. Two service workers on a 2-core machine then run four BLAS threads that
spin against each other and against the event loops: measured 150 req/s at p99 249 ms, against
1,601 req/s at p99 13 ms with one thread per worker. A pod whose CPU limit is below the node's
core count oversubscribes the same way. So every process sizes its pools from its CPU budget
(:func:`cpu_budget`) divided by the processes that share it, and says what it got
(:func:`thread_pools`, exported as ``freshrec_*_thread_pool_size``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")

# Read by the native libraries when they load; set before numpy/torch/numba are imported so
# their pools start at the right size (and so child processes inherit it).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                   "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
                   "NUMBA_NUM_THREADS")


def tune_gc() -> None:
    """Freeze the start-up heap out of the collector and collect the young generation lazily.

    The trainer and the joiner hold millions of long-lived objects (tables' bookkeeping, pending
    windows) and allocate many short-lived ones per message; CPython's default thresholds make
    every young collection rescan survivors. Measured: trainer parsing 15 -> 6 us per event,
    joiner throughput 130k -> 220k shown items/s (bench/joiner_core.py).
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2(root: Path) -> Path:
    """This process' cgroup v2 directory (``0::/path`` in /proc/self/cgroup), else ``root``."""
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        if line.startswith("0::"):
            own = root / line[3:].lstrip("/")
            if (own / "cpu.max").is_file():
                return own
    return root


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process' cgroup in CPUs (v2 ``cpu.max``, v1 CFS quota); None = none.

    Inside a container both views are namespaced to the container's own cgroup.
    """
    v2 = _read(_own_cgroup_v2(root) / "cpu.max")
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        if quota == "max" or not period:
            return None
        return int(quota) / int(period)
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            if int(quota) <= 0:  # -1: no quota
                return None
            return int(quota) / int(period)
    return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which taskset/cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_budget(configured: int | None = None, root: Path = CGROUP_ROOT) -> int:
    """Whole CPUs this process may keep busy.

    ``configured`` (the ``FRESHREC_CPU_THREADS`` setting) wins: an operator who says it means
    it. Otherwise the cgroup quota, rounded down (a 1.5-CPU limit gives one thread, leaving the
    half for the Kafka, publisher and GC threads instead of being throttled), capped by the
    CPUs in the affinity mask; with no quota, the affinity mask alone.
    """
    if configured is not None:
        return max(1, configured)
    cpus = usable_cpus()
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return cpus
    return max(1, min(cpus, math.floor(limit)))


def allowed_cpus() -> list[int]:
    """The CPUs of this process' affinity mask, in order (all CPUs off Linux)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def worker_cpu_sets(cpus: list[int], workers: int) -> list[set[int]]:
    """``cpus`` dealt round-robin to ``workers`` disjoint sets (every worker gets at least one
    CPU: needs ``workers <= len(cpus)``)."""
    if not 1 <= workers <= len(cpus):
        raise ValueError(f"cannot give {workers} workers disjoint sets of {len(cpus)} CPUs")
    return [set(cpus[i::workers]) for i in range(workers)]


def owns_cpus(configured: int | None = None, root: Path = CGROUP_ROOT) -> bool:
    """Whether this process may keep every CPU of its affinity mask busy: no configured budget
    and no cgroup quota below the mask (a whole machine, or a container with an exclusive
    cpuset, e.g. Kubernetes' static CPU manager). A container on a shared node under a CFS
    quota runs on every CPU of the node, a share of each: it owns none of them."""
    return cpu_budget(configured, root) >= usable_cpus()


def apply_thread_budget(threads: int) -> dict[str, int]:
    """Size every native thread pool of this process to ``threads``; return what they are now.

    Environment variables cover libraries not loaded yet and child processes; threadpoolctl
    resizes the BLAS/OpenMP pools of libraries already loaded; torch's own setters cover its
    intra-op pool (and its inter-op pool while that is still unused). numba's parallel pool is
    only bounded by ``NUMBA_NUM_THREADS`` before numba loads: freshrec's numba code is serial
    (``@njit`` without ``parallel``), so that pool never starts.
    """
    threads = max(1, int(threads))
    for var in THREAD_ENV_VARS:
        os.environ[var] = str(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        # Once torch has used its inter-op pool, the size is fixed: then it stays as it is.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    return thread_pools()


def thread_pools() -> dict[str, int]:
    """Threads each native pool of this process may use, by pool.

    Keys: ``openblas``/``mkl``/``blis``/``openmp`` (every loaded copy, the largest size),
    ``torch`` and ``torch_interop`` (when torch is loaded), ``numba`` (its parallel pool's
    bound, when numba is loaded).
    """
    from threadpoolctl import threadpool_info

    pools: dict[str, int] = {}
    for lib in threadpool_info():
        api = str(lib["internal_api"])
        pools[api] = max(pools.get(api, 0), int(lib["num_threads"]))
    torch = sys.modules.get("torch")
    if torch is not None:
        pools["torch"] = torch.get_num_threads()
        pools["torch_interop"] = torch.get_num_interop_threads()
    numba = sys.modules.get("numba")
    if numba is not None:
        pools["numba"] = int(numba.config.NUMBA_NUM_THREADS)
    return pools
