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
