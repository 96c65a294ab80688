"""Trainer faults against a real broker: future timestamps, part-way failures, divergence,
mass expiry, DLQ delivery, restored clocks."""

from __future__ import annotations

import json
import math
import time
from collections import Counter

import numpy as np
import orjson
import pytest
from msgspec.structs import replace

from featurestore.events import parse_labeled_event
from featurestore.featurize import SparseBatch, encode_value
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.integration.kafka_helpers import produce_events, read_topic
from tests.integration.test_trainer import run_trainer, sample
from trainer.learner import OnlineLearner
from trainer.main import build_trainer

pytestmark = pytest.mark.integration


def synthetic(n: int, seed: int) -> list[dict]:
    return list(SyntheticStream(SyntheticConfig(seed=seed)).events(n))


def holds_item(learner: OnlineLearner, batch: SparseBatch, item_id: str) -> bool:
    """Whether a featurized batch holds ``item_id`` in the model's item slot."""
    slot = learner.config.item_slot.name
    return bool(np.isin(encode_value(item_id), batch.slots[slot].ids))


def test_a_future_dated_event_is_dead_lettered_and_expires_nothing(settings: Settings) -> None:
    events = synthetic(2000, seed=21)
    future = dict(events[1000], event_id="from-2096", ts=4.0e9)
    produce_events(settings.kafka_bootstrap, settings.topic_events, [*events, future])
    trainer, _ = run_trainer(settings, len(events) + 1)
    assert trainer.trained == len(events)
    rows = {slot: st.rows for slot, st in trainer.tables.stats().items()}
    assert trainer.clock.now <= max(e["ts"] for e in events)
    assert trainer.sweep() == {}  # nothing expired
    assert {slot: st.rows for slot, st in trainer.tables.stats().items()} == rows
    dlq = read_topic(settings.kafka_bootstrap, settings.topic_dlq, 1)
    assert [orjson.loads(m.value())["event_id"] for m in dlq] == ["from-2096"]
    assert "ahead of wall clock" in dict(dlq[0].headers())["reason"].decode()


def test_a_batch_failing_part_way_is_not_trained_twice(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The poison event fails *after* the real step changed the tables and weights."""
    events = synthetic(300, seed=22)
    events[150] = dict(events[150], item_id="poison")
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    real_step = OnlineLearner.step_batch
    learned: dict[int, Counter] = {}  # id(tables) -> how often each event time was learned

    def step(self, batch, labels, ts, *args, **kwargs):
        result = real_step(self, batch, labels, ts, *args, **kwargs)
        learned.setdefault(id(self.tables), Counter()).update(np.asarray(ts).tolist())
        if holds_item(self, batch, "poison"):
            raise FloatingPointError("non-finite gradient")
        return result

    monkeypatch.setattr(OnlineLearner, "step_batch", step)
    trainer, metrics = run_trainer(settings, 300)
    assert trainer.trained == 299
    # The state that survived holds every good event exactly once (no checkpoint but the
    # initial one was taken, so everything in it was learned into these tables).
    final = learned[id(trainer.tables)]
    good = [e["ts"] for i, e in enumerate(events) if i != 150]
    assert sorted(final.elements()) == sorted(good)
    assert sample(metrics, "freshrec_trainer_rollbacks_total", reason="failed") >= 1
    dlq = read_topic(settings.kafka_bootstrap, settings.topic_dlq, 1)
    assert len(dlq) == 1
    assert dict(dlq[0].headers())["reason"].decode().startswith("<training>: FloatingPointError")
    assert orjson.loads(dlq[0].value())["item_id"] == "poison"


def test_a_diverged_model_is_never_published_and_rolls_back(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    events = synthetic(400, seed=23)
    events[200] = dict(events[200], item_id="nan-maker")
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    real_step = OnlineLearner.step_batch
    published_finite: list[bool] = []

    def step(self, batch, labels, ts, *args, **kwargs):
        result = real_step(self, batch, labels, ts, *args, **kwargs)
        if holds_item(self, batch, "nan-maker"):
            next(self.model.parameters()).data.fill_(math.nan)  # the step diverged
        return result

    from trainer.publisher import Publisher

    real_full, real_delta = Publisher._gather_full, Publisher._gather_delta

    def finite_model(self) -> bool:
        return all(bool(p.isfinite().all()) for p in self.state.model.parameters())

    def gather_full(self, now):  # what the publisher copies out to write to Redis
        published_finite.append(finite_model(self))
        return real_full(self, now)

    def gather_delta(self, now):
        published_finite.append(finite_model(self))
        return real_delta(self, now)

    monkeypatch.setattr(OnlineLearner, "step_batch", step)
    monkeypatch.setattr(Publisher, "_gather_full", gather_full)
    monkeypatch.setattr(Publisher, "_gather_delta", gather_delta)
    trainer, metrics = run_trainer(settings, 400)
    assert trainer.trained == 399
    assert all(bool(p.isfinite().all()) for p in trainer.learner.model.parameters())
    assert sample(metrics, "freshrec_trainer_rollbacks_total", reason="diverged") >= 1
    assert published_finite and all(published_finite)
    dlq = read_topic(settings.kafka_bootstrap, settings.topic_dlq, 1)
    assert "ModelDiverged" in dict(dlq[0].headers())["reason"].decode()
    ckpt = trainer.checkpointer.latest()
    from trainer.checkpoint import load_arrays
    assert all(np.isfinite(a).all() for a in load_arrays(ckpt.path / "dense").values())


def test_a_clock_jump_expires_at_most_the_capped_share(settings: Settings) -> None:
    trainer = build_trainer(settings)
    try:
        old = [parse_labeled_event(orjson.dumps(e)) for e in synthetic(3000, seed=24)]
        trainer.learn(old)
        before = trainer.tables.stats()
        # The clock jumps a year (a stream resuming after a long outage, or many skewed
        # clients): every old row is past its TTL, but one sweep takes at most a quarter.
        year = 365 * 86400.0
        later = [replace(e, ts=e.ts + year, event_id=e.event_id + "+1y", user_id="u-new",
                         item_id="i-new") for e in old]
        trainer.learn(later)
        evicted = trainer.sweep()
        for slot, st in trainer.tables.stats().items():
            gone = len(evicted.get(slot, []))
            assert gone <= max(int(0.25 * (before[slot].rows + 1)), 1000), slot
            assert st.rows > 0
        registry = trainer.metrics.registry
        assert sum(registry.get_sample_value("freshrec_trainer_expiry_capped_total",
                                             {"slot": s}) or 0 for s in before) >= 1
        for _ in range(30):  # a genuine catch-up completes over later sweeps
            trainer.sweep()
        assert trainer.tables[trainer.config.item_slot.name].stats().rows <= 2
    finally:
        trainer.close()


def test_historical_replay_expires_rows_and_bandit_statistics(settings: Settings) -> None:
    trainer = build_trainer(settings)
    try:
        t0 = 880_000_000.0  # MovieLens, 1997
        base = parse_labeled_event(orjson.dumps(synthetic(1, seed=25)[0]))
        first = [replace(base, ts=t0 + i, event_id=f"a{i}", item_id="old", label=i % 2)
                 for i in range(200)]
        ttl = trainer.tables[trainer.config.item_slot.name].config.ttl_seconds
        later = [replace(base, ts=t0 + ttl + 10 * 86400 + i, event_id=f"b{i}",
                         item_id=f"new{i % 5}", label=i % 2) for i in range(2000)]
        trainer.learn(first)
        trainer.learn(later)
        hook = trainer.hooks[0]
        from featurestore.featurize import encode_value
        had_stats = encode_value("old") in hook.bandit
        evicted = trainer.sweep()
        item_slot = trainer.config.item_slot.name
        assert encode_value("old") in evicted[item_slot]
        if had_stats:
            assert encode_value("old") not in hook.bandit
        assert trainer.clock.now > t0 + ttl
    finally:
        trainer.close()


def test_a_restored_future_clock_is_capped_at_wall_clock(settings: Settings) -> None:
    trainer = build_trainer(settings)
    trainer.learn([parse_labeled_event(orjson.dumps(e)) for e in synthetic(500, seed=26)])
    trainer.checkpoint()
    trainer.close()
    latest = trainer.checkpointer.latest()
    manifest = json.loads((latest.path / "manifest.json").read_text())
    # A checkpoint written while one 2096 event could still push the clock.
    manifest.pop("event_clock")
    manifest["max_event_ts"] = 4.0e9
    (latest.path / "manifest.json").write_text(json.dumps(manifest))
    restored = build_trainer(settings)
    try:
        assert restored.clock.now <= time.time() + settings.event_max_future_skew_s
        rows = {s: st.rows for s, st in restored.tables.stats().items()}
        restored.sweep()
        assert {s: st.rows for s, st in restored.tables.stats().items()} == rows
    finally:
        restored.close()


def test_undelivered_dead_letters_block_the_checkpoint(settings: Settings) -> None:
    trainer = build_trainer(settings)
    trainer.offsets = {(settings.topic_events, 0): 5}

    class StuckProducer:
        def flush(self, timeout: float) -> int:
            return 3  # three dead letters still queued after the timeout

        def poll(self, timeout: float) -> int:
            return 0

    real = trainer._dlq
    trainer._dlq = StuckProducer()
    before = trainer.checkpointer.latest()
    with pytest.raises(RuntimeError, match="dead-letter delivery failed"):
        trainer.checkpoint()
    assert trainer.checkpointer.latest() == before  # no checkpoint, no commit
    trainer._dlq = real
    trainer.offsets = {}
    trainer.close()


