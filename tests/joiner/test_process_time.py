"""The joiner process's clocks: skewed event times are refused, one outlier cannot close every
window, and clicks waiting for their impressions are bounded. Messages are built in memory; the
Kafka clients are created but never reach a broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Message

from featurestore.events import Click, Impression, ShownItem
from freshrec.settings import Settings
from joiner.process import JoinerProcess


@pytest.fixture
def proc(tmp_path: Path):
    s = Settings(kafka_bootstrap="127.0.0.1:9", joiner_checkpoint_dir=tmp_path / "ckpt",
                 joiner_window_s=5.0, joiner_lateness_s=0.5, joiner_metrics_port=0)
    p = JoinerProcess(s)
    p.dead = []
    p._dead_letter = lambda raw, key, source, reason: p.dead.append(reason)
    p._emit = lambda events: p.__dict__.setdefault("emitted_events", []).extend(events)
    yield p
    p._consumer.close()


def impression(i: int, ts: float) -> Message:
    imp = Impression(request_id=f"r{i}", ts=ts, user_id=f"u{i}", model_version=1,
                     items=[ShownItem(item_id="a", position=0, score=1.0, pctr=0.1)])
    return Message(topic="freshrec.impressions", partition=0, offset=i, value=imp.to_json())


def click(i: int, ts: float) -> Message:
    c = Click(event_id=f"c{i}", ts=ts, user_id=f"u{i}", item_id="a", request_id=f"r{i}")
    return Message(topic="freshrec.clicks", partition=0, offset=i, value=c.to_json())


def test_future_dated_impressions_and_clicks_are_dead_lettered(proc: JoinerProcess) -> None:
    now = time.time()
    proc.handle(impression(0, now + 86400))
    proc.handle(click(1, now + 86400))
    assert len(proc.dead) == 2 and all("ahead of wall clock" in r for r in proc.dead)
    assert proc.joiner.pending == 0


def test_one_outlier_impression_does_not_close_every_window(proc: JoinerProcess) -> None:
    now = time.time()
    for i in range(300):
        proc.handle(impression(i, now + i * 0.001))
    proc.handle(impression(300, now + 250))  # within the skew, far ahead of the stream
    proc.tick()
    assert proc.joiner.pending == 301  # no window closed early, no negative emitted
    assert not proc.__dict__.get("emitted_events")


def test_clicks_waiting_for_impressions_are_bounded(proc: JoinerProcess) -> None:
    proc.max_early_clicks = 5
    now = time.time()
    for i in range(12):  # clicks ahead of an impressions stream that has not started
        proc.handle(click(i, now + i))
    assert len(proc._early) == 5
    assert proc.metrics.registry.get_sample_value(
        "freshrec_joiner_dropped_total", {"reason": "early_clicks_full"}) == 7
    assert len(proc.dead) == 7 and all(r.startswith("orphan click") for r in proc.dead)
