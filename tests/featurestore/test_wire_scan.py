"""The compiled wire scanner is a fast path, never a second schema: for every batch it either
declines (``None``) or gives exactly what decoding the structs and featurizing them gives, and
it never accepts a value the struct decoder refuses."""

from __future__ import annotations

import json
import random

import msgspec
import numpy as np
import orjson
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.events import MAX_FEATURES, MAX_ID_LEN, MAX_LIST_LEN, decode_labeled_events
from featurestore.featurize import Featurizer
from featurestore.labeled_batch import LabeledBatch
from featurestore.schema import ModelConfig, load_model_config
from featurestore.wire_scan import WirePlan, scan_labeled_events
from featurestore.xxh64 import xxh64
from freshrec.settings import default_model_config_path

CONFIG = load_model_config(default_model_config_path())
# The shipped config plus a multi-valued slot read from a string, a categorical one read from
# numbers, and a second slot on the same source.
EXTENDED = ModelConfig.model_validate(CONFIG.model_dump() | {"slots": [
    *CONFIG.model_dump()["slots"],
    {"name": "tags", "source": "tags", "side": "item", "kind": "multi_valued", "dim": 8},
    {"name": "score", "source": "score", "side": "user", "dim": 8},
    {"name": "age_id", "source": "age", "side": "user", "dim": 8},
]})


def struct_path(values: list[bytes], config: ModelConfig) -> LabeledBatch:
    return LabeledBatch.of_events(decode_labeled_events(values), Featurizer(config))


def assert_agrees(values: list[bytes], config: ModelConfig = CONFIG) -> bool:
    """The scanner's batch equals the struct path's, or it declined; True if it scanned."""
    try:
        want = struct_path(values, config)
    except (msgspec.ValidationError, msgspec.DecodeError):
        assert scan_labeled_events(values, WirePlan.of(config)) is None, values
        return False
    got = scan_labeled_events(values, WirePlan.of(config))
    if got is None:
        return False
    assert len(got) == len(want)
    for name, ids in want.sparse.slots.items():
        assert got.sparse.slots[name].ids.tolist() == ids.ids.tolist(), (name, values)
        assert got.sparse.slots[name].offsets.tolist() == ids.offsets.tolist(), (name, values)
    assert got.labels.tolist() == want.labels.tolist()
    assert got.ts.tolist() == want.ts.tolist()
    if want.sample_rates is None:
        assert got.sample_rates is None
    else:
        assert got.sample_rates.tolist() == want.sample_rates.tolist()
    if want.contexts is None:
        assert got.contexts is None
    else:
        for field in ("counts", "clusters", "weights"):
            assert getattr(got.contexts, field).tolist() == getattr(want.contexts, field).tolist()
    assert got.event_ids() == want.event_ids()
    assert got.events == want.events  # decoded on demand, the same structs
    return True


def test_xxh64_is_the_xxhash_package_bit_for_bit() -> None:
    rng = random.Random(3)
    for n in [*range(70), 200, 1000]:
        data = bytes(rng.randrange(256) for _ in range(n))
        padded = np.frombuffer(b"ab" + data + b"cd", dtype=np.uint8)
        assert int(xxh64(padded, 2, 2 + n)) == xxhash.xxh64_intdigest(data)


BASE = {"event_id": "e1", "ts": 874724710.0, "user_id": "259", "item_id": "255", "label": 1,
        "features": {"age": "21", "gender": "M", "occupation": "student", "zip_prefix": "48",
                     "genres": ["Comedy", "Romance"], "release_year": "1997"}}


def with_features(**features) -> dict:
    return BASE | {"features": BASE["features"] | features}


@pytest.mark.parametrize("event", [
    BASE,
    BASE | {"features": {}},
    {k: v for k, v in BASE.items() if k != "features"},
    BASE | {"ts": 1796065224.0601234},  # 17 significant digits: Python's float
    BASE | {"ts": 0}, BASE | {"ts": 4102444800}, BASE | {"ts": 1.5e9},
    BASE | {"request_id": None}, BASE | {"request_id": "r1"}, BASE | {"context": None},
    BASE | {"p_true": 0.25, "sample_rate": 0.1}, BASE | {"p_true": None, "sample_rate": None},
    BASE | {"sample_rate": 0.1234567890123456789},
    with_features(release_year="unkonwn"), with_features(release_year=""),
    with_features(release_year="+"), with_features(release_year=1997),
    with_features(release_year=1997.5), with_features(release_year=["1997"]),
    with_features(release_year="1e3"), with_features(release_year="nan"),
    with_features(release_year="-inf"), with_features(release_year=" 1997 "),
    with_features(release_year="1_997"), with_features(release_year="01997"),
    with_features(age=30), with_features(age=-5), with_features(age=21.0),
    with_features(genres=[]), with_features(genres=["", "a"]), with_features(genres="a|b||c"),
    with_features(genres="|"), with_features(genres=7), with_features(genres=-7),
    with_features(genres=0), with_features(genres=1.5), with_features(extra="x", more=[1]),
    with_features(tags="x|y", score=3), with_features(tags=["x"], score=3.0),
    with_features(score=2.5), with_features(score=-0.0), with_features(score=1e300),
    with_features(score=123456789012345678), with_features(score=1234567890123456789),
    with_features(score=-9223372036854775808), with_features(gender="é"),
    with_features(gender="a\"b"), with_features(gender="x" * MAX_ID_LEN),
    with_features(gender="x" * (MAX_ID_LEN + 1)), with_features(genres=["g"] * MAX_LIST_LEN),
    with_features(genres=["g"] * (MAX_LIST_LEN + 1)),
    BASE | {"features": {f"f{k}": k for k in range(MAX_FEATURES)}},
    BASE | {"features": {f"f{k}": k for k in range(MAX_FEATURES + 1)}},
    with_features(gender=None), with_features(gender=True), with_features(gender={"a": 1}),
    with_features(genres=[["a"]]), with_features(genres=[1]),
    BASE | {"label": 2}, BASE | {"label": 1.0}, BASE | {"label": True}, BASE | {"label": "1"},
    BASE | {"ts": -1}, BASE | {"ts": 4102444800.5}, BASE | {"ts": "1"},
    BASE | {"user_id": ""}, BASE | {"user_id": 259}, BASE | {"item_id": "i" * 129},
    BASE | {"p_true": 1.5}, BASE | {"sample_rate": 0}, BASE | {"sample_rate": 1},
    BASE | {"unknown": 1}, BASE | {"context": {"clusters": [1], "weights": [0.5]}},
    BASE | {"context": {"clusters": [], "weights": []}},
    BASE | {"context": {"weights": [0.25, 1], "clusters": [3, 0]}},
    BASE | {"context": {"clusters": [1, 2], "weights": [0.1234567890123456789, 0.3]}},
    BASE | {"context": {"clusters": [1, 2], "weights": [0.5, 0.5000001]}},
    BASE | {"context": {"clusters": [1, 2], "weights": [0.5, 0.6]}},
    BASE | {"context": {"clusters": [1], "weights": [1.5]}},
    BASE | {"context": {"clusters": [1], "weights": [-0.0]}},
    BASE | {"context": {"clusters": [1, 2], "weights": [0.5]}},
    BASE | {"context": {"clusters": [-1], "weights": [0.5]}},
    BASE | {"context": {"clusters": [2**31], "weights": [0.5]}},
    BASE | {"context": {"clusters": [2**31 - 1], "weights": [0.5]}},
    BASE | {"context": {"clusters": [1.0], "weights": [0.5]}},
    BASE | {"context": {"clusters": [1], "weights": ["0.5"]}},
    BASE | {"context": {"clusters": [1], "weights": [0.5], "k": 1}},
    BASE | {"context": {"clusters": [1]}},
    BASE | {"context": {"clusters": list(range(64)), "weights": [1 / 64] * 64}},
    BASE | {"context": {"clusters": list(range(65)), "weights": [1 / 65] * 65}},
    BASE | {"context": []},
    {k: v for k, v in BASE.items() if k != "label"},
])
def test_edge_cases_agree_with_the_struct_path(event: dict) -> None:
    for config in (CONFIG, EXTENDED):
        assert_agrees([orjson.dumps(event)], config)
        assert_agrees([json.dumps(event, indent=1).encode()], config)  # whitespace, escapes


@pytest.mark.parametrize("raw", [
    b"", b"{}", b"[]", b"null", b"{", b'{"event_id":"e"', b"\xff",
    orjson.dumps(BASE) + b" x", orjson.dumps(BASE) + b" ", b" " + orjson.dumps(BASE),
    orjson.dumps(BASE).replace(b'"label":1', b'"label":1,"label":0'),
    orjson.dumps(BASE).replace(b'"age":"21"', b'"age":"21","age":"22"'),
    orjson.dumps(BASE).replace(b'"ts":874724710.0', b'"ts":874724710.'),
    orjson.dumps(BASE).replace(b'"ts":874724710.0', b'"ts":08747'),
    orjson.dumps(BASE).replace(b'"ts":874724710.0', b'"ts":1e999'),
    orjson.dumps(BASE).replace(b'"ts":874724710.0', b'"ts":-0'),
    orjson.dumps(BASE).replace(b'"ts":874724710.0', b'"ts":8.7e8'),
    orjson.dumps(BASE).replace(b'"label":1', b'"label":01'),
    orjson.dumps(BASE).replace(b'"label":1', b'"label":1e0'),
    orjson.dumps(BASE).replace(b'"user_id":"259"', b'"user_id":"2\\u00359"'),
    orjson.dumps(BASE).replace(b'"genres":["Comedy","Romance"]', b'"genres":["a",]'),
    orjson.dumps(BASE).replace(b'"age":"21"', b'"age":-0'),
    orjson.dumps(BASE).replace(b'"age":"21"', b'"age":1E2'),
    orjson.dumps(BASE).replace(b'"genres":["Comedy","Romance"]', b'"genres":-0'),
    orjson.dumps(BASE | {"context": {"clusters": [1], "weights": [0.5]}}).replace(
        b'"weights"', b'"clusters":[2],"weights"'),
    orjson.dumps(BASE | {"context": {"clusters": [1], "weights": [0.5]}}).replace(
        b'"weights":[0.5]', b'"weightz":[0.5]'),
])
def test_malformed_values_are_declined_or_agree(raw: bytes) -> None:
    for config in (CONFIG, EXTENDED):
        assert_agrees([raw], config)
        assert_agrees([orjson.dumps(BASE), raw], config)  # one bad value declines the batch


def test_a_tombstone_declines_the_batch() -> None:
    assert scan_labeled_events([orjson.dumps(BASE), None], WirePlan.of(CONFIG)) is None


_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
_number = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=False,
                                                             allow_infinity=False))
_value = st.one_of(_text, _number, st.lists(_text, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"event_id": _text.filter(bool), "ts": st.floats(0, 4.2e9), "user_id": _text.filter(bool),
     "item_id": _text.filter(bool), "label": st.integers(0, 1)},
    optional={"features": st.dictionaries(
        st.sampled_from(["age", "gender", "genres", "release_year", "tags", "score", "x"]),
        _value, max_size=6),
        "sample_rate": st.floats(0.01, 1.0), "p_true": st.floats(0, 1),
        "context": st.one_of(st.none(), st.integers(0, 5).flatmap(lambda k: st.fixed_dictionaries(
            {"clusters": st.lists(st.integers(0, 40), min_size=k, max_size=k),
             "weights": st.lists(st.floats(0, 0.3), min_size=k, max_size=k)}))),
        "request_id": st.one_of(st.none(), _text.filter(bool))}),
    min_size=1, max_size=8))
def test_generated_batches_agree_with_the_struct_path(events: list[dict]) -> None:
    assert_agrees([json.dumps(e, separators=(",", ":")).encode() for e in events], EXTENDED)
    assert_agrees([json.dumps(e).encode() for e in events], EXTENDED)


def test_a_stream_like_the_replay_takes_the_fast_path() -> None:
    """Not vacuous: producer-shaped events are scanned, not declined."""
    rng = random.Random(5)
    events = [with_features(age=str(rng.randrange(10, 80)), genres=rng.sample(["a", "b", "c"], 2))
              | {"event_id": f"e{i}", "user_id": f"u{rng.randrange(50)}",
                 "ts": 1.7e9 + rng.random() * 1e5} for i in range(500)]
    assert assert_agrees([orjson.dumps(e) for e in events])
