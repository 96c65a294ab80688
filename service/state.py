"""What every route of one replica shares, kept on ``app.state.service``.

One object rather than loose ``app.state`` attributes: handlers read it with one lookup, and
tests see at a glance what a replica holds. ``follower``, ``supervisor`` and ``sink`` exist only
between start-up and shutdown (the lifespan creates and closes them).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from featurestore.schema import ModelConfig
from freshrec.metrics import ServiceMetrics
from freshrec.settings import Settings
from service.impressions import KafkaSink
from service.scoring import Scorer
from service.snapshot import ServingSnapshot, SnapshotFollower
from service.supervise import FollowerSupervisor


@dataclass
class ServiceState:
    """Settings, model config, metrics and the scorer; the follower and sink while running."""

    settings: Settings
    config: ModelConfig
    metrics: ServiceMetrics
    scorer: Scorer
    follower: SnapshotFollower | None = None
    supervisor: FollowerSupervisor | None = None
    sink: KafkaSink | None = None
    # False from start-up until the ``when_loaded`` hook of ``create_app`` (if any) has run on
    # the first snapshot: /readyz waits for it, so no request lands in the middle of it.
    warm: bool = True

    @property
    def snapshot(self) -> ServingSnapshot | None:
        """The snapshot being served, if one is loaded."""
        return None if self.follower is None else self.follower.snapshot

    @property
    def following(self) -> bool:
        """Whether a follower is running (keeping the snapshot current)."""
        return self.supervisor is not None and self.supervisor.running


async def service_state(request: Request) -> ServiceState:
    """FastAPI dependency: this replica's shared state.

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in its
    thread pool, a thread hop per request for one attribute lookup.
    """
    return request.app.state.service
