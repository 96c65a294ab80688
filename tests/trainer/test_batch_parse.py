"""Trainer._parse_clean: a clean batch parsed in one pass gives what the per-message path gives;
any batch with something to dead-letter is left to the per-message path, untouched."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from confluent_kafka import KafkaError, Message

from featurestore.schema import load_model_config
from freshrec.settings import Settings, default_model_config_path
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.loop import Trainer

CONFIG = load_model_config(default_model_config_path())


def trainer(tmp_path: Path) -> Trainer:
    # Nothing here talks to the broker: clients connect lazily, and only parsing is exercised.
    return Trainer(Settings(kafka_bootstrap="127.0.0.1:9", trainer_checkpoint_dir=tmp_path),
                   CONFIG)


def messages(values: list[bytes]) -> list[Message]:
    return [Message(topic="events", partition=i % 3, offset=100 + i, value=v, error=None)
            for i, v in enumerate(values)]


def clean_values(n: int = 40) -> list[bytes]:
    return [orjson.dumps(e) for e in SyntheticStream(SyntheticConfig(seed=4)).events(n)]


def test_a_clean_batch_parses_as_the_per_message_path_does(tmp_path: Path) -> None:
    fast, slow = trainer(tmp_path / "a"), trainer(tmp_path / "b")
    msgs = messages(clean_values())
    wall = time.time()
    events = fast._parse_clean(msgs, wall)
    expected, sources = slow._parse_each(msgs, wall)
    assert events == expected
    assert sources == msgs
    assert fast.offsets == slow.offsets == {("events", 0): 140, ("events", 1): 138,
                                            ("events", 2): 139}
    assert fast.dead_lettered == slow.dead_lettered == 0


def test_a_batch_with_anything_to_dead_letter_is_left_untouched(tmp_path: Path) -> None:
    t = trainer(tmp_path)
    good = clean_values()
    future = orjson.loads(good[5]) | {"ts": time.time() + 10 * t.settings.event_max_future_skew_s}
    eof = Message(topic="events", partition=0, offset=7, value=None,
                  error=KafkaError(KafkaError._PARTITION_EOF))
    for batch in (messages([*good[:3], b"not json", *good[3:]]),
                  messages([*good[:3], b"", *good[3:]]),
                  messages([*good[:3], orjson.dumps({"event_id": "x"})]),
                  messages([*good[:5], orjson.dumps(future)]),
                  [*messages(good[:3]), eof]):
        assert t._parse_clean(batch, time.time()) is None
        assert t.offsets == {}
    t._culprits["some-event"] = "<training>: ValueError"
    assert t._parse_clean(messages(good), time.time()) is None


def test_a_learned_batch_whose_booking_fails_is_state_damage_not_a_retry(
        tmp_path: Path, monkeypatch) -> None:
    """Booking a step that succeeded (window, counters, audit log) cannot be retried event by
    event: the events are learned. Its failure asks for a rollback, like a half-applied step."""
    import pytest

    from featurestore.events import parse_labeled_event
    from trainer.loop import StateDamaged
    from trainer.progressive import ProgressiveWindow

    def full_disk(self, labels, probs) -> None:
        raise OSError("disk full")

    t = trainer(tmp_path)
    events = [parse_labeled_event(v) for v in clean_values()]
    monkeypatch.setattr(ProgressiveWindow, "add", full_disk)
    before = t.learner.mutations
    with pytest.raises(StateDamaged, match="booking a learned batch: OSError"):
        t.learn(events)
    assert t.learner.mutations == before + 1 and t.trained == 0
    t._release()
