"""Keep the snapshot follower alive: restart it with backoff when it dies, and say whether it runs.

The follower already rides out Redis outages itself (it retries and keeps serving the last
snapshot). Anything else that escapes it — a bug, an unexpected payload — used to end its task
silently while ``/readyz`` stayed 200, so a replica served an ever older model. Here such a death
is logged, counted (``freshrec_service_snapshot_follower_restarts_total``) and followed by a full
reload and a restart; ``running`` is False between the death and the restart, which ``/readyz``
reports as 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from freshrec.metrics import ServiceMetrics
from service.snapshot import SnapshotFollower

log = logging.getLogger("freshrec.service")


class FollowerSupervisor:
    """Runs ``follower.run()`` in a task and restarts it whenever it raises."""

    def __init__(self, follower: SnapshotFollower, metrics: ServiceMetrics, *,
                 min_backoff_s: float = 0.1, max_backoff_s: float = 10.0,
                 healthy_after_s: float = 60.0) -> None:
        self.follower = follower
        self.metrics = metrics
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        # A follower that ran this long before dying starts over from the shortest backoff.
        self.healthy_after_s = healthy_after_s
        self.restarts = 0
        self._running = False
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True while the follower is inside ``run()`` (not dead, not waiting to restart)."""
        return self._running and self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="snapshot-follower")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel the follower; give up waiting after ``timeout_s``.

        redis-py's cluster client was seen to swallow a cancellation that lands inside a
        command and retry: with the cluster gone, a worker then never finished its shutdown
        and outlived its parent. The cancellation is repeated until it lands between commands;
        after ``timeout_s`` the rest of the shutdown goes on (the event loop's own close cancels
        the task once more).
        """
        task = self._task
        if task is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not task.done():
            task.cancel()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning("snapshot follower did not stop within %.0f s; shutting down "
                            "without it", timeout_s)
                return
            await asyncio.wait({task}, timeout=min(0.5, remaining))
        with suppress(asyncio.CancelledError, Exception):
            task.result()

    async def _supervise(self) -> None:
        backoff = self.min_backoff_s
        while True:
            started = time.monotonic()
            self._running = True
            try:
                await self.follower.run()
                log.error("snapshot follower returned; restarting")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("snapshot follower died; restarting in %.1f s", backoff)
            finally:
                self._running = False
            self.restarts += 1
            self.metrics.follower_restarts.inc()
            if time.monotonic() - started > self.healthy_after_s:
                backoff = self.min_backoff_s
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)
            await self._resync()

    async def _resync(self) -> None:
        """Reload the full snapshot: the death may have left a delta half-applied.

        On failure (Redis away, the same bug) the old snapshot stays in place and the restarted
        follower retries through its own path.
        """
        try:
            await self.follower.load_full()
        except Exception as exc:  # logged; the restarted follower retries
            log.warning("full reload before restarting the follower failed: %s", exc)
