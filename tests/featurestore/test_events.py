"""The wire schema rejects bad messages with the field named, and round-trips good ones."""

from __future__ import annotations

import orjson
import pytest

from featurestore.events import EventRejected, LabeledEvent, parse_labeled_event

GOOD = {
    "event_id": "e-1",
    "ts": 1700000000.25,
    "user_id": "u42",
    "item_id": "m7",
    "label": 1,
    "features": {"age": "25", "gender": "F", "genres": ["Action", "Drama"], "hour": 13},
    "request_id": "r-9",
}


def test_good_event_round_trips() -> None:
    event = parse_labeled_event(orjson.dumps(GOOD))
    assert event.features["genres"] == ["Action", "Drama"]
    assert parse_labeled_event(event.to_json()) == event


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda e: e.pop("user_id"), "user_id"),
        (lambda e: e.update(label=3), "label"),
        (lambda e: e.update(ts="yesterday"), "ts"),
        (lambda e: e.update(ts=1.7e12), "ts"),  # milliseconds, not seconds
        (lambda e: e.update(item_id="x" * 10_000), "item_id"),
        (lambda e: e.update(features={"genres": ["a"] * 1000}), "features.genres"),
        (lambda e: e.update(surprise=1), "surprise"),
    ],
)
def test_rejection_names_the_field(mutate, field: str) -> None:
    event = dict(GOOD)
    mutate(event)
    with pytest.raises(EventRejected) as exc:
        parse_labeled_event(orjson.dumps(event))
    assert exc.value.reason.startswith(field)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"\xff\xfe"])
def test_non_json_is_rejected_not_raised(raw: bytes) -> None:
    with pytest.raises(EventRejected):
        parse_labeled_event(raw)


def test_unset_optionals_are_not_serialized() -> None:
    event = LabeledEvent(event_id="e", ts=1.0, user_id="u", item_id="i", label=0)
    assert orjson.loads(event.to_json()) == {
        "event_id": "e",
        "ts": 1.0,
        "user_id": "u",
        "item_id": "i",
        "label": 0,
        "features": {},
    }


_EDGE_CASES = [
    {"label": 1.0}, {"label": True}, {"label": -1}, {"ts": 0}, {"ts": -0.5}, {"ts": 4.2e9},
    {"user_id": ""}, {"user_id": "é" * 128}, {"user_id": "é" * 129}, {"user_id": 5},
    {"features": {"k" * 64: 1}}, {"features": {"k" * 65: 1}},
    {"features": {f"f{i}": i for i in range(64)}}, {"features": {f"f{i}": i for i in range(65)}},
    {"features": {"x": 5.0}}, {"features": {"x": 2**63}}, {"features": {"x": -(2**63)}},
    {"features": {"x": 1e308}}, {"features": {"x": True}}, {"features": {"x": None}},
    {"features": {"x": {"y": 1}}}, {"features": {"x": ["a"] * 64}}, {"features": {"x": [1]}},
    {"features": {"x": "v" * 129}}, {"request_id": None}, {"request_id": ""},
    {"context": {"clusters": [0, 2**31 - 1], "weights": [0.5, 0.5]}},
    {"context": {"clusters": [2**31], "weights": [1.0]}}, {"context": {"clusters": [1]}},
    {"p_true": 1.5}, {"sample_rate": 0}, {"sample_rate": 1}, {"sample_rate": 0.25},
]


@pytest.mark.parametrize("change", _EDGE_CASES)
def test_the_fast_path_accepts_exactly_what_the_http_schema_accepts(change: dict) -> None:
    raw = orjson.dumps({**GOOD, **change}, option=orjson.OPT_NON_STR_KEYS)
    try:
        want = LabeledEvent.model_validate_json(raw)
    except ValueError:
        want = None
    try:
        got = parse_labeled_event(raw)
    except EventRejected:
        assert want is None
        return
    assert want is not None
    assert orjson.loads(got.to_json()) == orjson.loads(want.to_json()) or (
        change == {"features": {"x": 5.0}})  # 5.0: an int to pydantic, a float to msgspec


def test_huge_numbers_parse_to_the_same_reason_on_both_paths() -> None:
    raw = orjson.dumps(GOOD)[:-1] + b', "p_true": 1e999}'
    with pytest.raises(EventRejected) as exc:
        parse_labeled_event(raw)
    assert exc.value.reason.startswith("p_true")
