"""FollowerSupervisor.stop: a follower that swallows cancellation cannot hold up a shutdown."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from freshrec.metrics import ServiceMetrics
from service.supervise import FollowerSupervisor


class _Stubborn:
    """Swallows the first ``swallow`` cancellations, as redis-py's cluster client did with one
    that landed inside a command (it retried the command)."""

    def __init__(self, swallow: int) -> None:
        self.swallow = swallow
        self.cancellations = 0

    async def run(self) -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > self.swallow:
                    raise


class _Polite:
    async def run(self) -> None:
        await asyncio.sleep(3600)


def _supervisor(follower: object) -> FollowerSupervisor:
    return FollowerSupervisor(follower, ServiceMetrics(registry=CollectorRegistry()))  # type: ignore[arg-type]


def test_stop_cancels_again_until_the_follower_stops() -> None:
    async def scenario() -> tuple[bool, int]:
        follower = _Stubborn(swallow=2)
        sup = _supervisor(follower)
        sup.start()
        await asyncio.sleep(0.05)
        await sup.stop(timeout_s=5.0)
        return sup.running, follower.cancellations

    running, cancellations = asyncio.run(scenario())
    assert not running and cancellations == 3


def test_stop_gives_up_waiting_after_its_timeout() -> None:
    async def scenario() -> float:
        follower = _Stubborn(swallow=100)
        sup = _supervisor(follower)
        sup.start()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await sup.stop(timeout_s=0.6)
        took = time.monotonic() - started
        follower.swallow = 0  # let the loop's own shutdown end it
        return took

    assert asyncio.run(scenario()) < 1.5


def test_stop_returns_at_once_for_a_follower_that_honours_cancellation() -> None:
    async def scenario() -> bool:
        sup = _supervisor(_Polite())
        sup.start()
        await asyncio.sleep(0.05)
        await sup.stop(timeout_s=5.0)
        return sup.running

    assert asyncio.run(scenario()) is False
