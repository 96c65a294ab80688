"""The joiner process handles a consumed batch as it would its messages one at a time: the same
labels, dead letters (with their reasons) and counters, whatever the batch boundaries."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from confluent_kafka import KafkaError, Message

from featurestore.events import BanditContext, Click, Impression, ShownItem
from joiner.process import JoinerProcess
from tests.joiner.conftest import offline_process

IMPS, CLICKS = "freshrec.impressions", "freshrec.clicks"


def stream(now: float) -> list[Message]:
    """40 requests of 3 items on 2 partitions, then input that must be refused or dead-lettered,
    then newer impressions that close the first windows."""
    msgs: list[Message] = []
    offsets = {(IMPS, 0): 0, (IMPS, 1): 0, (CLICKS, 0): 0}

    def add(topic: str, value: bytes, partition: int = 0) -> None:
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] = offset + 1
        msgs.append(Message(topic=topic, partition=partition, offset=offset, value=value,
                            key=b"k"))

    def imp(r: int, ts: float) -> bytes:
        return Impression(
            request_id=f"r{r}", ts=ts, user_id=f"u{r % 5}", model_version=1,
            features={"age": "25", "hour": r % 24},
            items=[ShownItem(item_id=f"m{k}", position=k, score=1.0, pctr=0.1, explored=k == 2,
                             features={"genres": ["Drama", f"g{r}"]} if k else {})
                   for k in range(3)],
            context=BanditContext(clusters=[1, 2], weights=[0.6, 0.4])).to_json()

    for r in range(40):
        add(IMPS, imp(r, now + r * 0.01), partition=r % 2)
        if r % 4 == 1:  # a click in the window, one ahead of the impressions read so far
            add(CLICKS, Click(event_id=f"c{r}", ts=now + r * 0.01 + (0.5 if r % 8 == 1 else 0),
                              user_id=f"u{r % 5}", item_id="m1", request_id=f"r{r}").to_json())
    add(IMPS, imp(3, now + 0.03), partition=1)  # a redelivered impression
    add(IMPS, b"{not json")
    add(CLICKS, Click(event_id="c1", ts=now + 0.01, user_id="u1", item_id="m1",
                      request_id="r1").to_json())  # a duplicate click
    add(CLICKS, Click(event_id="no-rid", ts=now + 0.2, user_id="u2", item_id="m0").to_json())
    add(CLICKS, Click(event_id="orphan", ts=now, user_id="u1", item_id="nope",
                      request_id="r-x").to_json())
    add(CLICKS, Click(event_id="future", ts=now + 86_400, user_id="u1", item_id="m1",
                      request_id="r1").to_json())
    msgs.append(Message(topic=IMPS, partition=0, offset=99,
                        error=KafkaError(KafkaError._PARTITION_EOF)))
    for r in range(40, 340):  # the impressions stream moves past the first windows
        add(IMPS, imp(r, now + 20 + r * 0.001), partition=r % 2)
    return msgs


def run(process: JoinerProcess, msgs: list[Message], batch: int, wall: float) -> dict:
    produced: list[tuple[str, dict, bytes | None, list | None]] = []
    process._produce = lambda topic, value, key, headers=None: produced.append(
        (topic, orjson.loads(value) if topic != process.settings.topic_dlq else value, key,
         headers))
    process._produce_batch = lambda topic, labels: produced.extend(
        (topic, orjson.loads(value), key, None) for key, value in labels)
    clock = [0.0]
    process._monotonic = lambda: clock[0]
    # One wall time for every run: the future-skew reason states the distance in seconds.
    process._wall = lambda: wall
    for i in range(0, len(msgs), batch):
        process.handle_batch(msgs[i:i + batch])
        process.tick()
    # The clicks stopped: once the click clock has stood still for joiner_click_idle_s, the
    # windows behind the impressions close.
    clock[0] += process.settings.joiner_click_idle_s
    process.tick()
    counters = {(m.name, tuple(sorted(s.labels.items()))): s.value
                for m in process.metrics.registry.collect() for s in m.samples
                if s.name.endswith("_total")}
    process._consumer.close()
    # Per topic: labels go out per batch, dead letters at once, so only the order within a
    # topic is the stream's.
    produced.sort(key=lambda message: message[0])
    return {"produced": produced, "counters": counters, "offsets": dict(process.offsets)}


def test_batches_give_what_single_messages_give(tmp_path: Path) -> None:
    now = time.time()
    msgs = stream(now)
    one = run(offline_process(tmp_path / "a"), msgs, batch=1, wall=now)
    for size in (7, len(msgs)):
        assert run(offline_process(tmp_path / f"b{size}"), msgs, batch=size, wall=now) == one

    labels = {v["event_id"]: v["label"] for t, v, _, _ in one["produced"] if t.endswith("events")}
    # Every shown item of the 40 closed requests has its label; clicked ones are positives.
    assert {f"r{r}:m{k}" for r in range(40) for k in range(3)} <= set(labels)
    assert {e for e, label in labels.items() if label == 1} == \
        {f"r{r}:m1" for r in range(40) if r % 4 == 1} | {"r17:m0"}
    reasons = [dict(h)["reason"].decode() for t, _, _, h in one["produced"]
               if t.endswith("dlq")]
    assert len(reasons) == 3
    assert any("json" in r.lower() for r in reasons)
    assert any(r.startswith("orphan click") for r in reasons)
    assert any("ahead of wall clock" in r for r in reasons)
    c = one["counters"]
    assert c[("freshrec_joiner_impressions", ())] == 341  # the duplicate is consumed too
    assert c[("freshrec_joiner_clicks", (("outcome", "joined"),))] == 11
    assert c[("freshrec_joiner_clicks", (("outcome", "duplicate"),))] == 1
    assert c[("freshrec_joiner_clicks", (("outcome", "invalid"),))] == 1
    assert c[("freshrec_joiner_examples", (("label", "1"),))] == 11
    assert one["offsets"][(IMPS, 0)] == 171  # the consumer error moved no offset
