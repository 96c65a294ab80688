"""Bulk work of a latency-sensitive process on one thread of lower CPU priority.

A serving worker decodes full snapshots (a 1 M-row reload is ~0.2 s of CPU) and prepares
deltas off its event loop, in a thread. With each worker pinned to its own CPU, that thread and
the event loop share one core at equal priority, so while a reload runs the loop gets about
half of it and requests queue behind each other. Here the thread runs ``BACKGROUND_NICE``
steps below the process (a Linux thread has its own nice value), so the scheduler gives the
core to the event loop whenever it has a request and the bulk work takes the idle time.

Priority inversion cannot starve the loop for long: the bulk work is mostly numpy calls that
release the GIL, and when the loop waits for the GIL it is not runnable, so the low-priority
thread runs and hands the GIL over at the next switch interval.

One thread, not a pool: the snapshot follower applies updates in order anyway, and one bulk
job at a time bounds the memory of a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

BACKGROUND_NICE = 10  # added to the process' nice value for the background thread

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _lower_priority() -> None:
    """Raise the calling thread's nice value by ``BACKGROUND_NICE`` (Linux: per thread)."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or not permitted
        os.setpriority(os.PRIO_PROCESS, tid,
                       min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))


def background_executor() -> ThreadPoolExecutor:
    """This process' background thread (created on first use, after any fork)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="background",
                                           initializer=_lower_priority)
        return _executor


async def in_background(fn: Callable[..., T], *args: object) -> T:
    """``await`` ``fn(*args)`` run on the background thread (``asyncio.to_thread``'s role)."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(background_executor(), functools.partial(fn, *args))
