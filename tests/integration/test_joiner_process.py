"""The joiner process against a real broker: labels out, orphans dead-lettered, crash-safe."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from featurestore.events import Click, Impression, ShownItem
from freshrec.settings import Settings
from tests.conftest import settings_env
from tests.integration.kafka_helpers import drain_topic, produce, read_topic

pytestmark = pytest.mark.integration


def impressions_and_clicks(n_requests: int, t0: float) -> tuple[list[Impression], list[Click],
                                                                 dict[str, int]]:
    """Requests of 4 shown items; every 3rd request's item 1 is clicked (twice: a duplicate)."""
    imps, clicks, expected = [], [], {}
    for r in range(n_requests):
        rid, ts = f"r{r}", t0 + r * 0.01
        items = [ShownItem(item_id=f"i{k}", position=k, score=1.0, pctr=0.1,
                           features={"genres": ["Drama"]}) for k in range(4)]
        imps.append(Impression(request_id=rid, ts=ts, user_id=f"u{r % 7}", model_version=1,
                               features={"age": 30}, items=items))
        for k in range(4):
            expected[f"{rid}:i{k}"] = 0
        if r % 3 == 0:
            click = Click(event_id=f"c{r}", ts=ts + 1.0, user_id=f"u{r % 7}", item_id="i1",
                          request_id=rid)
            clicks += [click, click]
            expected[f"{rid}:i1"] = 1
    return imps, clicks, expected


def start_joiner(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", "joiner"], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def checkpointed_offsets(settings: Settings) -> int:
    """Messages covered by the joiner's latest checkpoint."""
    latest = settings.joiner_checkpoint_dir / "LATEST"
    if not latest.exists():
        return 0
    path = settings.joiner_checkpoint_dir / latest.read_text().strip() / "manifest.json"
    return sum(sum(parts.values()) for parts in orjson.loads(path.read_bytes())["offsets"].values())


def labels_by_id(settings: Settings, expected: int, idle_s: float = 8.0) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for m in read_topic(settings.kafka_bootstrap, settings.topic_events, expected, idle_s):
        e = orjson.loads(m.value())
        out.setdefault(e["event_id"], set()).add(e["label"])
    return out


def test_joiner_labels_survive_kill_9_mid_window(settings: Settings, tmp_path: Path) -> None:
    t0 = time.time()
    imps, clicks, expected = impressions_and_clicks(300, t0)
    orphan = Click(event_id="orphan", ts=t0, user_id="u1", item_id="nope", request_id="r-x")
    env = settings_env(settings, joiner_checkpoint_interval_s=0.2)
    bootstrap = settings.kafka_bootstrap
    produce(bootstrap, settings.topic_impressions, [i.to_json() for i in imps[:150]])
    produce(bootstrap, settings.topic_clicks, [c.to_json() for c in clicks[:100]])

    first = start_joiner(env, tmp_path / "joiner-1.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and checkpointed_offsets(settings) < 150:
            time.sleep(0.1)
        assert checkpointed_offsets(settings) >= 150, "the first joiner never checkpointed"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()

    wide = Impression(request_id="r-wide", ts=t0, user_id="u1", model_version=1,
                      features={f"r{k}": k for k in range(40)},
                      items=[ShownItem(item_id="i0", position=0, score=1.0, pctr=0.1,
                                       features={f"i{k}": k for k in range(40)})])
    produce(bootstrap, settings.topic_impressions,
            [i.to_json() for i in imps[150:]] + [b"{not json", wide.to_json()])
    produce(bootstrap, settings.topic_clicks,
            [c.to_json() for c in clicks[100:]] + [orphan.to_json()])
    second = start_joiner(env, tmp_path / "joiner-2.log")
    try:
        # A SIGKILLed member holds its partitions until its session times out (~10 s).
        labels_by_id(settings, len(expected), idle_s=30.0)
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()
    # Everything the joiners ever produced, to the end of the topic: a duplicate or a flipped
    # label emitted late (a replay after the restore) is in here, not lost to a timer.
    got: dict[str, list[int]] = {}
    for m in drain_topic(bootstrap, settings.topic_events):
        e = orjson.loads(m.value())
        got.setdefault(e["event_id"], []).append(e["label"])

    # Every shown item got its label, and only that label.
    assert set(got) == set(expected)
    assert {k: v[0] for k, v in got.items()} == expected
    # A crash may repeat a label (at-least-once output), never flip it.
    flipped = {k: v for k, v in got.items() if len(set(v)) > 1}
    assert not flipped, f"labels flipped: {dict(list(flipped.items())[:5])}"
    # Bad input is dead-lettered with its reason, and the joiner kept going.
    dlq = read_topic(bootstrap, settings.topic_dlq, 3)
    reasons = sorted(dict(m.headers())["reason"].decode() for m in dlq)
    assert len(reasons) == 3
    assert any(r.startswith("orphan click") for r in reasons)
    assert any("json" in r.lower() for r in reasons)
    assert any("features" in r for r in reasons)


def test_a_backlog_caught_up_joins_every_click(settings: Settings) -> None:
    """Both topics written before the joiner starts, across many windows: the impressions are
    read faster than the clicks, and no window may close before its clicks are read."""
    import threading

    import numpy as np

    from joiner.process import JoinerProcess

    rng = np.random.default_rng(3)
    t0 = time.time() - 3600
    n, per_s = 3000, 100.0  # 30 s of event time: six 5 s windows
    imps, clicks, expected = [], [], {}
    for r in range(n):
        rid, ts = f"r{r}", t0 + r / per_s
        # Wide impressions, narrow clicks: the impressions topic is most of the bytes.
        imps.append(Impression(
            request_id=rid, ts=ts, user_id=f"u{r}", model_version=1,
            features={f"f{k}": "x" * 20 for k in range(20)},
            items=[ShownItem(item_id=f"i{k}", position=k, score=1.0, pctr=0.1,
                             features={"genres": ["Drama", "Comedy"]}) for k in range(5)]))
        expected.update({f"{rid}:i{k}": 0 for k in range(5)})
        for k in np.flatnonzero(rng.random(5) < 0.2).tolist():
            clicks.append(Click(event_id=f"c{r}-{k}", ts=ts + float(rng.uniform(0, 4)),
                                user_id=f"u{r}", item_id=f"i{k}",
                                request_id=rid if k % 4 else None))
            expected[f"{rid}:i{k}"] = 1
    clicks.sort(key=lambda c: c.ts)
    bootstrap = settings.kafka_bootstrap
    # One key: each topic's backlog is one partition, the other partition of each is empty.
    produce(bootstrap, settings.topic_impressions, [i.to_json() for i in imps])
    produce(bootstrap, settings.topic_clicks, [c.to_json() for c in clicks])

    process = JoinerProcess(settings)
    stop = threading.Event()
    thread = threading.Thread(target=process.run, args=(stop,), daemon=True)
    thread.start()
    try:
        got = labels_by_id(settings, len(expected), idle_s=15.0)
    finally:
        stop.set()
        thread.join(30)
    counts = process.joiner.counts()
    assert (counts.clicks_joined, counts.clicks_orphan, counts.clicks_late) == \
        (len(clicks), 0, 0)
    assert {k: next(iter(v)) for k, v in got.items()} == expected
    assert all(len(v) == 1 for v in got.values())
