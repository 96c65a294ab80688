"""The closed loop in simulation: users with known click probabilities use the live pipeline.

Trainer, joiner and service run as real processes on the session's broker and Redis. Simulated
users request scores, click by ground truth; clicks flow through Kafka and the joiner back into
the trainer, and the service scores with what was learned.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from freshrec.devstack import LocalStack, free_port
from freshrec.metrics import scrape
from freshrec.settings import Settings
from freshrec.simulate import ClosedLoop, ClosedLoopConfig
from tests.conftest import settings_env

pytestmark = pytest.mark.integration


def trained_events(port: int) -> float:
    """``freshrec_trainer_events_total{outcome="trained"}`` from the trainer's /metrics."""
    return scrape(f"http://127.0.0.1:{port}/metrics").get(
        "freshrec_trainer_events_total{outcome=trained}", 0.0)


def test_served_ctr_rises_and_new_items_get_discovered(
        stack: LocalStack, settings: Settings, tmp_path: Path) -> None:
    port, trainer_port = free_port(), free_port()
    env = settings_env(settings, service_port=port, joiner_window_s=2.0,
                       joiner_lateness_s=0.2, trainer_publish_interval_ms=100,
                       trainer_metrics_port=trainer_port, joiner_metrics_port=free_port(),
                       bandit_clusters=8, bandit_alpha=0.3)
    pipeline = LocalStack(external_kafka=stack.kafka_bootstrap, external_redis=stack.redis_url,
                          log_dir=tmp_path / "logs")
    try:
        pipeline.start_pipeline(env, f"http://127.0.0.1:{port}/readyz")
        loop = ClosedLoop(f"http://127.0.0.1:{port}", settings.kafka_bootstrap,
                          settings.topic_clicks,
                          ClosedLoopConfig(requests=3000, window=300, rate=120, seed=3))
        loop.warm_up(lambda: trained_events(trainer_port) > 0)
        result = loop.run()
        assert pipeline.check_children() is None
    finally:
        pipeline.stop()
    assert result.errors == 0
    served = np.array([w["served_p"] for w in result.windows])
    random_p = np.array([w["random_p"] for w in result.windows])
    # Learning: the last third (not one noisy window) serves clearly better than random and
    # than the same service did before the trainer had learned anything (warm-up).
    last = served[-3:].mean()
    assert last > 1.2 * random_p[-3:].mean(), result.windows
    assert last > result.untrained["served_p"] + 0.03, (result.untrained, result.windows)
    # Exploration: new items get shown though the model has never seen them, mostly thanks to
    # the bonus (``explored``: in the top k only because of it).
    assert result.discovered_share(min_age=500) >= 0.6, result.new_items
    assert result.discovered_by_exploration >= 0.25 * len(result.discovery_requests)
