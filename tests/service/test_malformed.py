"""Every malformed request gets a 4xx with a JSON body, never a 5xx: named cases on every
route, then hypothesis over raw bytes and over structurally mutated JSON (the mutators of
bench/http_fuzz.py), all in-process against a replica serving a real snapshot."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from bench.http_fuzz import GET_ROUTES, fuzz_case
from featurestore.featurize import Featurizer
from featurestore.schema import SlotSide, load_model_config
from freshrec.devstack import LocalStack
from freshrec.kafka import create_topics
from freshrec.settings import Settings, default_model_config_path
from service.app import create_app
from service.candidates import CandidateIds
from service.schemas import ScoreRequest, _parse_plain, parse_score_body
from tests.conftest import Names
from tests.service.test_service import AUTH, TOKEN, body, build_world, poll

pytestmark = pytest.mark.integration

SCORE = b'{"user_id":"u1","features":{"age":%s},"candidates":[{"item_id":"m1"}]}'
EVENT = b'{"event_id":"e1","ts":%s,"user_id":"u1","item_id":"m1","label":1}'
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> Iterator[TestClient]:
    """One replica for the module (building the world costs seconds; the cases milliseconds)."""
    names = Names(f"t-malformed-{uuid.uuid4().hex[:6]}")
    create_topics(stack.kafka_bootstrap, names.topics, partitions=1)
    settings = Settings(kafka_bootstrap=stack.kafka_bootstrap, redis_url=stack.redis_url,
                        topic_events=names.events, topic_impressions=names.impressions,
                        topic_clicks=names.clicks, topic_dlq=names.dlq,
                        model_name=names.prefix, service_api_token=TOKEN)
    build_world(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        poll(lambda: c.get("/readyz").status_code == 200, "ready")
        yield c


def _check(resp, status: int | None = None, loc: list | None = None) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if status is not None:
        assert resp.status_code == status, resp.text[:300]
    detail = resp.json()["detail"]  # always a JSON body
    if loc is not None:  # the error is located at ``loc`` or inside it
        assert any(d["loc"][: len(loc)] == loc for d in detail), detail


@pytest.mark.parametrize(("value", "loc"), [
    (b"NaN", ["body", "features"]), (b"Infinity", ["body", "features"]),
    (b"-Infinity", ["body", "features"]), (b"1e400", ["body", "features"]),
    (b"9223372036854775808", ["body", "features"]), (b"-9223372036854775809", ["body", "features"]),
    (b"1" * 5000, ["body"]), (b"[" * 5000 + b"]" * 5000, ["body"]),
    (b'"\\ud800"', None), (b'"\xff"', ["body"]),
])
def test_malformed_values_in_a_score_request_get_422(client: TestClient, value: bytes,
                                                     loc: list | None) -> None:
    _check(client.post("/v1/score", content=SCORE % value, headers=JSON), 422, loc)


@pytest.mark.parametrize(("raw", "status", "loc"), [
    (EVENT % b"NaN", 422, ["body"]), (EVENT % b"Infinity", 422, ["body"]),
    (EVENT % b"-Infinity", 422, ["body"]), (EVENT % b"-1", 422, ["body", "ts"]),
    (EVENT % b"1e400", 422, ["body"]), (EVENT % b"18446744073709551616", 422, ["body", "ts"]),
    (b'{"event_id":"e1","event_id":"e2","ts":1,"user_id":"u","item_id":"m","label":1}', 422,
     ["body"]),
    (b'{"a":' * 3000 + b"1" + b"}" * 3000, 422, ["body"]),
    (b"[" + b",".join([EVENT % b"1"] * 1001) + b"]", 422, ["body"]),
    (b"\xef\xbb\xbf" + EVENT % b"1", 422, ["body"]), (b"", 422, ["body"]),
    ((EVENT % b"1").replace(b'"u1"', b'"u\xc0\x80"'), 422, ["body"]),
])
def test_malformed_event_bodies_get_422(client: TestClient, raw: bytes, status: int,
                                        loc: list) -> None:
    _check(client.post("/v1/events", content=raw, headers=JSON | AUTH), status, loc)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "image/png"])
def test_wrong_content_types_get_415(client: TestClient, content_type: str) -> None:
    for path in ("/v1/score", "/v1/events"):
        resp = client.post(path, content=b"\xff\xfe", headers={"content-type": content_type}
                           | AUTH)
        _check(resp, 415, ["body"])


def test_plain_and_json_with_charset_bodies_still_work(client: TestClient) -> None:
    raw = body(0, [1, 2])
    for headers in ({}, {"content-type": "application/json; charset=utf-8"}):
        assert client.post("/v1/score", content=orjson.dumps(raw), headers=headers
                           ).status_code == 200
        event = {"event_id": "ok", "ts": time.time(), "user_id": "u1", "item_id": "m1",
                 "label": 0}
        assert client.post("/v1/events", content=orjson.dumps(event),
                           headers=headers | AUTH).status_code == 202


def test_get_routes_ignore_bodies(client: TestClient) -> None:
    for path in GET_ROUTES:
        resp = client.request("GET", path, content=b"\xff{NaN", headers=JSON)
        assert resp.status_code == 200, path


_FUZZ = hsettings(max_examples=100, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))


def test_raw_bytes_never_get_5xx(client: TestClient) -> None:
    @_FUZZ
    @given(raw=st.binary(max_size=2048), path=st.sampled_from(["/v1/score", "/v1/events"]),
           ct=st.sampled_from([None, "application/json", "application/json; charset=latin-1"]))
    def check(raw: bytes, path: str, ct: str | None) -> None:
        resp = client.post(path, content=raw, headers=AUTH | ({"content-type": ct} if ct else {}))
        _check(resp)

    check()


def test_mutated_json_never_gets_5xx(client: TestClient) -> None:
    seen: set[int] = set()

    @_FUZZ
    @given(seed=st.integers(0, 2**32 - 1))
    def check(seed: int) -> None:
        case = fuzz_case(random.Random(seed), TOKEN)
        resp = client.request(case.method, case.path, content=case.body, headers=case.headers)
        assert resp.status_code < 500, (case, resp.status_code, resp.text[:300])
        seen.add(resp.status_code)

    check()
    assert {200, 422} <= seen  # the cases reach both the handlers and the validators


@pytest.mark.parametrize("raw", [
    SCORE % b"NaN", SCORE % b"1e400", SCORE % b"9223372036854775808",
    SCORE % b"18446744073709551616", SCORE % b"-9223372036854775809", SCORE % b"1.0",
    SCORE % b'"\\ud800"', SCORE % b"true",
    b'{"user_id":"u1","user_id":"u2","candidates":[{"item_id":"m1"}]}',
    b'{"user_id":"u1","candidates":[{"item_id":"m1"}],"top_k":18446744073709551616}',
])
def test_the_score_fast_path_agrees_with_the_schema(raw: bytes) -> None:
    """orjson's fast path either returns what pydantic would, or defers to it."""
    config = load_model_config(default_model_config_path())
    table = CandidateIds(Featurizer(config),
                         [s.name for s in config.slots if s.side is SlotSide.ITEM])
    plain = _parse_plain(raw, table)
    try:
        req = ScoreRequest.model_validate_json(raw)
    except ValueError:
        assert plain is None
        with pytest.raises(RequestValidationError):
            parse_score_body(raw, table)
        return
    if plain is not None:
        assert (plain.user_id, plain.features, plain.top_k) == (req.user_id, req.features,
                                                                req.top_k)
