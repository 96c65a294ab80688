"""The joiner process's clocks: skewed event times are refused, one outlier cannot close every
window, and clicks waiting for their impressions are bounded. Messages are built in memory; the
Kafka clients are created but never reach a broker."""

from __future__ import annotations

import time

from confluent_kafka import Message

from featurestore.events import Click, Impression, ShownItem
from joiner.process import JoinerProcess


def impression(i: int, ts: float, partition: int = 0) -> Message:
    imp = Impression(request_id=f"r{i}", ts=ts, user_id=f"u{i}", model_version=1,
                     items=[ShownItem(item_id="a", position=0, score=1.0, pctr=0.1)])
    return Message(topic="freshrec.impressions", partition=partition, offset=i,
                   value=imp.to_json())


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


def test_a_partition_read_ahead_does_not_release_clicks_of_one_behind(
        proc: JoinerProcess) -> None:
    now = time.time()
    proc.handle(impression(0, now, partition=1))  # partition 1 has started, then lags
    for i in range(1, 200):  # partition 0 is read 20 s ahead (backlog after a restart)
        proc.handle(impression(i, now + 20 + i * 0.01, partition=0))
    proc.handle(click(500, now + 3))  # its impression r500 is still unread in partition 1
    assert not proc.dead  # waiting, not an orphan
    proc.handle(impression(500, now + 2, partition=1))
    for i in range(600, 640):
        proc.handle(impression(i, now + 21 + i * 0.001, partition=1))
    assert not proc.dead
    assert any(e.event_id == "r500:a" and e.label == 1
               for e in proc.__dict__.get("emitted_events", []))


def test_a_lagging_click_stream_holds_windows_and_pauses_impressions(
        proc: JoinerProcess) -> None:
    """A backlog: the impressions are read 30 s ahead while the clicks have not been read yet.
    No window closes while the click stream is waited for or moving, the impressions partition
    is paused meanwhile, and once the clicks stand still (for a window, as the click
    partition's end was never fetched) the windows a window behind the impressions close and
    the partition resumes."""
    from confluent_kafka import TopicPartition

    clock = [100.0]
    proc._monotonic = lambda: clock[0]
    proc._on_assign(proc._consumer, [TopicPartition("freshrec.impressions", 0),
                                     TopicPartition("freshrec.clicks", 0)])
    now = time.time() - 600
    for i in range(300):  # 30 s of impressions, six windows
        proc.handle(impression(i, now + i * 0.1))
    proc.tick()
    assert proc._paused == {0}
    assert not proc.__dict__.get("emitted_events")  # the unread clicks are waited for

    clock[0] += 1.0
    proc.handle_batch([click(i, now + i * 0.1 + 1) for i in range(10)] + [click(150, now + 15.5)])
    proc.tick()
    counts = proc.joiner.counts()
    assert (counts.clicks_joined, counts.clicks_late, counts.clicks_orphan) == (11, 0, 0)
    assert proc._paused == {0}
    assert all(e.label == 1 for e in proc.__dict__.get("emitted_events", []))

    clock[0] += proc.settings.joiner_click_idle_s  # the clicks stopped, their end not known
    proc.tick()
    assert all(e.label == 1 for e in proc.__dict__.get("emitted_events", []))
    clock[0] += proc.settings.joiner_window_s  # waited a window for the unknown end
    proc.tick()
    labels = {e.event_id: e.label for e in proc.__dict__["emitted_events"]}
    assert labels["r20:a"] == 0 and labels["r5:a"] == 1
    assert not proc._paused
