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


def test_service_and_trainer_compute_the_same_context_for_warm_cold_and_unknown_users() -> None:
    """The trainer's computed context (table rows) equals the served one (snapshot rows)."""
    from types import SimpleNamespace

    from service.scoring import Scorer
    from service.snapshot import SlotVectors

    config = load_model_config(default_model_config_path())
    settings = Settings(bandit_clusters=4, bandit_top_k=2)
    learner = OnlineLearner(config)
    hook = ExplorationHook.from_settings(settings, config)
    profiles = [{"age": 20 + 7 * (i % 6), "gender": "MF"[i % 2], "occupation": f"o{i % 5}",
                 "zip_prefix": f"{i % 9}{i % 4}"} for i in range(40)]
    events = [LabeledEvent(event_id=f"e{i}", ts=1000.0 + i, user_id=f"u{i % 40}",
                           item_id=f"m{i % 5}", label=int(i % 5 == 0), features=profiles[i % 40])
              for i in range(400)]
    _train(learner, events)
    hook.on_batch(events, learner)
    assert hook.clusters.n_initialized == 4
    snapshot = SimpleNamespace(
        slots={name: SlotVectors.build(t.config.dim, *t.all_rows())
               for name, t in learner.tables.items()},
        centroids=hook.clusters.centroids, counts=hook.clusters.counts)
    scorer = Scorer(config, alpha=0.1, top_k_clusters=2)
    users = [("u3", profiles[3]),  # warm: user-ID row and profile rows
             ("new-user", profiles[8]),  # cold: no user-ID row, known profile values
             ("stranger", {"occupation": "never-seen"})]  # nothing known: the fallback
    probe = [LabeledEvent(event_id=f"p{k}", ts=5000.0, user_id=u, item_id="m1", label=0,
                          features=f) for k, (u, f) in enumerate(users)]
    vectors = hook.user_vectors(learner, probe)
    assert np.abs(vectors[1]).sum() > 0 and np.abs(vectors[2]).sum() == 0
    _, train_cl, train_w = hook.contexts(probe, vectors)
    for k, (user, feats) in enumerate(users):
        _, _, tower = scorer._features(snapshot, user, feats, [("m1", {"genres": ["Drama"]})])
        np.testing.assert_allclose(tower, vectors[k], rtol=1e-6, atol=1e-7)
        cl, w = scorer.context(snapshot, tower)
        assert cl.tolist() == train_cl[k].tolist(), user
        np.testing.assert_allclose(w, train_w[k], rtol=1e-6)
    # the cold user is placed by its profile, not the population fallback
    fallback = np.argsort(-hook.clusters.counts, kind="stable")[:2]
    cold_ctx = train_cl[1].tolist()
    assert cold_ctx != fallback.tolist() or train_w[1, 0] != 0.5


def test_one_tower_per_distinct_user_learns_what_one_per_event_does(monkeypatch) -> None:
    """The hook computes the tower, the clustering and the contexts once per distinct user of a
    batch, each user weighing its events: the clusters, the churn counts and the statistics
    are those of one tower per event."""
    import copy

    import trainer.exploration as exploration

    hook, learner = _setup()
    events = _events(400)  # 40 users: each appears several times per batch
    _train(learner, events)
    hook.on_batch(events[:200], learner)  # every centre seeded
    assert hook.clusters.n_initialized == 4
    per_event = copy.deepcopy(hook)
    hook.on_batch(events[200:], learner)
    monkeypatch.setattr(exploration, "distinct_examples",
                        lambda batch: (np.arange(batch.size), np.arange(batch.size)))
    per_event.on_batch(events[200:], learner)
    np.testing.assert_allclose(hook.clusters._centers, per_event.clusters._centers, rtol=1e-9)
    np.testing.assert_allclose(hook.clusters._counts, per_event.clusters._counts, rtol=1e-12)
    assert (hook.assigned, hook.reassigned) == (per_event.assigned, per_event.reassigned)
    assert hook.assigned > 0
    ours, theirs = hook.bandit.to_arrays(), per_event.bandit.to_arrays()
    for key in ("item_ids", "d", "b"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-9)


def test_warm_up_leaves_the_hook_as_it_was() -> None:
    hook, learner = _setup()
    events = _events(200)
    _train(learner, events)
    hook.on_batch(events, learner)
    before = {**hook.bandit.to_arrays(), **hook.clusters.to_arrays()}
    hook.warm_up()
    after = {**hook.bandit.to_arrays(), **hook.clusters.to_arrays()}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
