"""The exploration hook: logged contexts win, computed ones fill in, state round-trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore.events import BanditContext, LabeledEvent
from featurestore.featurize import encode_value, event_record
from featurestore.schema import load_model_config
from freshrec.settings import Settings, default_model_config_path
from trainer.exploration import ExplorationHook
from trainer.learner import OnlineLearner


def _events(n: int, context: BanditContext | None = None, start: int = 0) -> list[LabeledEvent]:
    return [LabeledEvent(event_id=f"e{i}", ts=1000.0 + i, user_id=f"u{i % 40}",
                         item_id=f"m{i % 5}", label=int(i % 5 == 0), context=context)
            for i in range(start, start + n)]


def _setup() -> tuple[ExplorationHook, OnlineLearner]:
    config = load_model_config(default_model_config_path())
    settings = Settings(bandit_clusters=4, bandit_top_k=2)
    learner = OnlineLearner(config)
    return ExplorationHook.from_settings(settings, config), learner


def _train(learner: OnlineLearner, events: list[LabeledEvent]) -> None:
    records = [event_record(e.user_id, e.item_id, e.features) for e in events]
    learner.step(records, np.array([e.label for e in events]), np.array([e.ts for e in events]))


def test_rewards_land_under_the_logged_context() -> None:
    hook, learner = _setup()
    ctx = BanditContext(clusters=[3], weights=[1.0])
    events = _events(50, ctx)
    _train(learner, events)
    hook.on_batch(events, learner)
    ids = np.array([encode_value("m0")])
    mean, _ = hook.bandit.score(ids, np.array([3]), np.array([1.0]))
    # m0 got 10 clicks out of 10 under cluster 3: b = 10, d = λ + 10.
    assert mean[0] == pytest.approx(10.0 / 11.0)
    other, _ = hook.bandit.score(ids, np.array([1]), np.array([1.0]))
    assert other[0] == 0.0


def test_computed_contexts_once_clusters_exist_and_duplicates_skipped() -> None:
    hook, learner = _setup()
    events = _events(200)
    _train(learner, events)
    hook.on_batch(events, learner)
    assert hook.clusters.n_initialized == 4
    assert len(hook.bandit) == 5
    version = hook.bandit.version
    hook.on_batch(events, learner)  # a redelivered batch
    assert hook.bandit.version == version or hook.bandit.changes_since(version)[0].size == 0


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    hook, learner = _setup()
    events = _events(100)
    _train(learner, events)
    hook.on_batch(events, learner)
    hook.save(tmp_path)
    restored, _ = _setup()
    restored.load(tmp_path)
    ids = np.array([encode_value(f"m{i}") for i in range(5)])
    a = hook.bandit.score(ids, np.array([0, 1]), np.array([0.5, 0.5]))
    b = restored.bandit.score(ids, np.array([0, 1]), np.array([0.5, 0.5]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(hook.clusters.centroids, restored.clusters.centroids)
