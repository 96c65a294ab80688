"""The trainer against a real broker: every event trained or dead-lettered, nothing lost."""

from __future__ import annotations

import threading

import orjson
import pytest

from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.integration.kafka_helpers import produce, produce_events, read_topic
from trainer.main import build_trainer

pytestmark = pytest.mark.integration


def run_trainer(settings: Settings, expected: int, timeout: float = 60.0) -> tuple:
    """Run a trainer in a thread until it has consumed ``expected`` messages."""
    metrics = TrainerMetrics()
    trainer = build_trainer(settings, metrics)
    thread = threading.Thread(target=trainer.run, kwargs={"max_events": expected}, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"trainer stuck at {trainer.stats()}"
    return trainer, metrics


def sample(metrics: TrainerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_all_produced_events_are_trained_and_counted(settings: Settings) -> None:
    events = list(SyntheticStream(SyntheticConfig(seed=5)).events(3000))
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    trainer, metrics = run_trainer(settings, 3000)
    assert trainer.trained == 3000
    assert sample(metrics, "freshrec_trainer_events_total", outcome="trained") == 3000
    assert sample(metrics, "freshrec_trainer_events_total", outcome="dead_lettered") == 0
    assert trainer.checkpointer.latest() is not None
    committed = sum(trainer.checkpointer.latest().offsets[settings.topic_events].values())
    assert committed == 3000


def test_malformed_messages_go_to_the_dlq_with_reasons(settings: Settings) -> None:
    good = list(SyntheticStream(SyntheticConfig(seed=6)).events(200))
    huge = dict(good[0], event_id="huge", item_id="x" * 100_000)
    bad_values = [
        b"not json at all",
        orjson.dumps({k: v for k, v in good[1].items() if k != "label"}),
        orjson.dumps(dict(good[2], label="yes")),
        orjson.dumps(dict(good[3], ts=[1, 2])),
        orjson.dumps(huge),
        orjson.dumps(dict(good[4], features={"genres": ["x"] * 5000})),
        b"",
    ]
    values = [orjson.dumps(e) for e in good[:100]] + bad_values + [
        orjson.dumps(e) for e in good[100:]]
    produce(settings.kafka_bootstrap, settings.topic_events, values)
    trainer, metrics = run_trainer(settings, len(values))
    assert trainer.trained == 200
    assert trainer.dead_lettered == len(bad_values)
    assert sample(metrics, "freshrec_trainer_events_total", outcome="dead_lettered") == 7
    dlq = read_topic(settings.kafka_bootstrap, settings.topic_dlq, len(bad_values))
    assert len(dlq) == len(bad_values)
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dlq)
    assert any(r.startswith("label") for r in reasons)
    assert any(r.startswith("item_id") for r in reasons)
    assert any(r.startswith("features.genres") for r in reasons)
    assert any("JSON" in r or "json" in r for r in reasons)
    for m in dlq:
        headers = dict(m.headers())
        assert headers["source_topic"].decode() == settings.topic_events
        assert int(headers["source_offset"]) >= 0


def test_an_event_that_breaks_training_is_dead_lettered_not_fatal(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    events = list(SyntheticStream(SyntheticConfig(seed=8)).events(300))
    events[150] = dict(events[150], item_id="poison")
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)

    from featurestore.featurize import encode_value
    from trainer.learner import OnlineLearner

    real_step = OnlineLearner.step_batch
    poison = encode_value("poison")

    def step(self, batch, *args, **kwargs):
        if poison in batch.slots["item"].ids:
            raise FloatingPointError("non-finite gradient")
        return real_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(OnlineLearner, "step_batch", step)
    trainer, metrics = run_trainer(settings, 300)
    assert trainer.trained == 299
    assert sample(metrics, "freshrec_trainer_events_total", outcome="trained") == 299
    dlq = read_topic(settings.kafka_bootstrap, settings.topic_dlq, 1)
    assert len(dlq) == 1
    assert dict(dlq[0].headers())["reason"].decode().startswith(
        "<training>: FloatingPointError")
    assert orjson.loads(dlq[0].value())["item_id"] == "poison"


def test_the_pipelined_loop_learns_what_its_batches_learned_one_after_another_give(
        settings: Settings, tmp_path) -> None:
    """The shipped trainer (exploration hook, publisher) consuming from Kafka, each step
    started before the previous batch is booked, ends in the state of a second trainer that
    learns the same batches synchronously, in the same order: bit for bit."""
    import numpy as np

    from trainer.model import model_arrays

    events = list(SyntheticStream(SyntheticConfig(seed=11)).events(12_000))
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    settings = settings.model_copy(update={"trainer_batch_max_events": 1000,
                                           "trainer_sweep_interval_s": 3600.0})
    metrics = TrainerMetrics()
    trainer = build_trainer(settings, metrics)
    batches = []
    begin = trainer._begin

    def recording_begin(batch):
        batches.append(batch)
        return begin(batch)

    trainer._begin = recording_begin
    thread = threading.Thread(target=trainer.run, kwargs={"max_events": len(events)},
                              daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), f"trainer stuck at {trainer.stats()}"
    assert trainer.trained == len(events) and len(batches) > 3

    replica = build_trainer(settings.model_copy(update={
        "trainer_checkpoint_dir": tmp_path / "replica"}), TrainerMetrics())
    try:
        for batch in batches:
            replica.learn(batch)
    finally:
        replica._release()
    a, b = trainer.learner, replica.learner
    for name, weights in model_arrays(a.model).items():
        assert np.array_equal(weights, model_arrays(b.model)[name]), name
    for slot in a.tables:
        ids_a, emb_a = a.tables[slot].all_rows()
        ids_b, emb_b = b.tables[slot].all_rows()
        assert np.array_equal(ids_a, ids_b) and np.array_equal(emb_a, emb_b), slot
    hook_a, hook_b = trainer.hooks[0], replica.hooks[0]
    for key, value in hook_a.bandit.to_arrays().items():
        assert np.array_equal(value, hook_b.bandit.to_arrays()[key]), key
    assert trainer.window.scores().auc == replica.window.scores().auc


def test_a_booking_that_fails_beside_the_next_step_rolls_both_back(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """When booking a learned batch fails while the next step already runs, the trainer goes
    back to its checkpoint and learns both again: every event is counted once at the end."""
    from trainer.progressive import ProgressiveWindow

    events = list(SyntheticStream(SyntheticConfig(seed=12)).events(8000))
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    settings = settings.model_copy(update={"trainer_batch_max_events": 1000})
    real_add = ProgressiveWindow.add
    calls = [0]

    def add(self, labels, probs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError("disk full")
        return real_add(self, labels, probs)

    monkeypatch.setattr(ProgressiveWindow, "add", add)
    trainer, metrics = run_trainer(settings, len(events))
    assert sample(metrics, "freshrec_trainer_rollbacks_total", reason="failed") == 1
    assert trainer.trained == len(events)
    assert trainer.dead_lettered == 0
    committed = sum(trainer.checkpointer.latest().offsets[settings.topic_events].values())
    assert committed == len(events)
