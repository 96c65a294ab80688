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
from freshrec.simulate import ClosedLoop, ClosedLoopConfig, ClosedLoopResult
from tests.conftest import Names, make_settings, settings_env

pytestmark = pytest.mark.integration


def trained_events(port: int) -> float:
    """``freshrec_trainer_events_total{outcome="trained"}`` from the trainer's /metrics."""
    return scrape(f"http://127.0.0.1:{port}/metrics").get(
        "freshrec_trainer_events_total{outcome=trained}", 0.0)


def run_loop(stack: LocalStack, settings: Settings, log_dir: Path) -> ClosedLoopResult:
    """One closed-loop run on a fresh trainer, joiner and service (``settings``: own topics
    and model, so a run starts from nothing)."""
    port, trainer_port = free_port(), free_port()
    env = settings_env(settings, service_port=port, joiner_window_s=2.0,
                       joiner_lateness_s=0.2, trainer_publish_interval_ms=100,
                       trainer_metrics_port=trainer_port, joiner_metrics_port=free_port(),
                       bandit_clusters=8, bandit_alpha=0.3)
    pipeline = LocalStack(external_kafka=stack.kafka_bootstrap, external_redis=stack.redis_url,
                          log_dir=log_dir)
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
    return result


def learned_and_discovered(result: ClosedLoopResult) -> str | None:
    """Why ``result`` fails the test's claims, or None when it meets them."""
    if result.errors:
        return f"{result.errors} failed requests"
    served = np.array([w["served_p"] for w in result.windows])
    random_p = np.array([w["random_p"] for w in result.windows])
    # Learning: in the last third (not one noisy window) the model's own picks (shown items
    # the bonus did not add) are clearly better than random candidates, and than what the
    # service served before the trainer had learned anything (warm-up). All served items
    # together include what exploration costs, reported beside it.
    exploited = np.array([w["exploited_p"] for w in result.windows])
    last = float(np.nanmean(exploited[-3:]))
    if not (last > 1.2 * random_p[-3:].mean() and last > result.untrained["served_p"] + 0.03):
        return (f"not learned: model's picks {last:.3f}, served {served[-3:].mean():.3f}, "
                f"untrained {result.untrained}, windows {result.windows}")
    # Exploration: new items get shown though the model has never seen them, mostly thanks to
    # the bonus (``explored``: in the top k only because of it).
    if result.discovered_share(min_age=500) < 0.6:
        return f"new items not discovered: {result.new_items}"
    if result.discovered_by_exploration < 0.25 * len(result.discovery_requests):
        return (f"discovered by exploration {result.discovered_by_exploration} of "
                f"{len(result.discovery_requests)}")
    return None


def test_the_model_learns_in_the_loop_and_new_items_get_discovered(
        stack: LocalStack, settings: Settings, names: Names, tmp_path: Path) -> None:
    """One retry on a fresh pipeline: this short, fast-paced run is a noisy verdict. Its
    learning curve was seen to dip in the last third, and the explored share to climb to
    60-75 % late in some runs (every click was joined), more often on a contended machine."""
    failures = []
    for attempt in range(2):
        if attempt:  # its own topics, groups and model: nothing carried over
            settings = make_settings(stack, Names(f"{names.prefix}-again"), tmp_path / "again")
        why = learned_and_discovered(run_loop(stack, settings, tmp_path / f"logs{attempt}"))
        if why is None:
            return
        failures.append(why)
    raise AssertionError("\n".join(failures))
