"""Who may write what: tokens, pipeline-only fields, future event times, Redis credentials,
and a snapshot follower that cannot die unnoticed. Real Redis, real broker, real uvicorn."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import orjson
import pytest
import redis

from freshrec.devstack import LocalStack, free_port
from freshrec.settings import Settings
from service.auth import Writer, authenticate
from tests.integration.kafka_helpers import read_topic
from tests.service.test_service import AUTH, TOKEN, body, build_world, poll, serve

pytestmark = pytest.mark.integration

INTERNAL = "pipeline-token-abcdefghijklmnop"
EVENT = {"event_id": "e1", "ts": 1_000.0, "user_id": "u1", "item_id": "m1", "label": 1}


def test_events_are_refused_without_a_configured_token(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="freshrec.service")
    with serve(settings, wait_ready=False) as client:
        assert client.post("/v1/events", json=EVENT).status_code == 401
        # Even a guess of the (unset) token gets nowhere.
        r = client.post("/v1/events", json=EVENT, headers={"Authorization": "Bearer x" * 20})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "refuses every request (401): no token is configured" in caplog.text


def test_events_open_only_when_explicitly_configured(settings: Settings) -> None:
    opened = settings.model_copy(update={"service_events_auth": "none"})
    with serve(opened, wait_ready=False) as client:
        assert client.post("/v1/events", json=EVENT).status_code == 202
        # Presenting a wrong token is still an error, not a silent downgrade.
        r = client.post("/v1/events", json=EVENT, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401


def test_tokens_are_checked_whole_and_name_the_writer() -> None:
    s = Settings(service_api_token=TOKEN, service_internal_token=INTERNAL)
    assert authenticate(s, f"Bearer {TOKEN}") is Writer.PUBLIC
    assert authenticate(s, f"bearer {INTERNAL}") is Writer.INTERNAL
    for bad in (None, f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer",
                f"Bearer {TOKEN[:-1]}é", TOKEN):
        with pytest.raises(Exception) as exc:
            authenticate(s, bad)
        assert getattr(exc.value, "status_code", None) == 401, bad
    # Secrets never show in the settings' repr (which ends up in logs and tracebacks).
    assert TOKEN not in repr(s) and INTERNAL not in repr(s)


def test_pipeline_only_fields_need_the_internal_token(settings: Settings) -> None:
    settings = settings.model_copy(update={"service_api_token": TOKEN,
                                           "service_internal_token": INTERNAL})
    internal = {"Authorization": f"Bearer {INTERNAL}"}
    ctx = {"clusters": [1, 2], "weights": [0.7, 0.3]}
    with serve(settings, wait_ready=False) as client:
        for field, value in (("p_true", 0.3), ("sample_rate", 0.5), ("context", ctx),
                             ("context", None)):
            r = client.post("/v1/events", json=dict(EVENT, **{field: value}), headers=AUTH)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["body", field]
        r = client.post("/v1/events", json=[EVENT, dict(EVENT, p_true=0.1)], headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", 1, "p_true"]
        full = dict(EVENT, p_true=0.3, sample_rate=0.5, context=ctx)
        assert client.post("/v1/events", json=full, headers=internal).status_code == 202
        # Context weights are a bounded distribution, even from the pipeline.
        for weights in ([1e300, 0.0], [0.9, 0.9], [-0.5, 0.5], [0.5]):
            bad = dict(EVENT, context={"clusters": [1, 2], "weights": weights})
            r = client.post("/v1/events", json=bad, headers=internal)
            assert r.status_code == 422, weights
            assert r.json()["detail"][0]["loc"][:2] == ["body", "context"]
    got = read_topic(settings.kafka_bootstrap, settings.topic_events, 1)
    assert len(got) == 1  # only the internal writer's event was produced


def test_future_dated_events_are_refused_and_dead_lettered(settings: Settings) -> None:
    settings = settings.model_copy(update={"service_api_token": TOKEN})
    now = time.time()
    ok = dict(EVENT, ts=now + settings.event_max_future_skew_s - 30)
    future = dict(EVENT, event_id="e-future", ts=now + 4.0e9 - now)  # the year 2096
    with serve(settings, wait_ready=False) as client:
        r = client.post("/v1/events", json=future, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "ts"]
        r = client.post("/v1/events", json=[ok, dict(future, event_id="e-f2")], headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", 1, "ts"]
        for ts in ("NaN", "Infinity", "-1"):
            raw = f'{{"event_id":"e","ts":{ts},"user_id":"u","item_id":"m","label":0}}'
            r = client.post("/v1/events", content=raw, headers=AUTH)
            assert r.status_code == 422, ts
        assert client.post("/v1/events", json=ok, headers=AUTH).status_code == 202
        metrics = client.get("/metrics").text
    assert 'freshrec_service_events_dead_lettered_total{reason="future_ts"} 2.0' in metrics
    dead = read_topic(settings.kafka_bootstrap, settings.topic_dlq, 2)
    assert sorted(orjson.loads(m.value())["event_id"] for m in dead) == ["e-f2", "e-future"]
    headers = dict(dead[0].headers())
    assert b"ahead of the service clock" in headers["reason"]
    assert headers["reason"].startswith(b"ts: ")
    assert set(headers) >= {"source_topic", "source_partition", "source_offset"}
    # Nothing of a refused request reached the events topic; the valid event did.
    got = read_topic(settings.kafka_bootstrap, settings.topic_events, 1)
    assert [orjson.loads(m.value())["ts"] for m in got] == [ok["ts"]]


def test_a_dead_follower_is_restarted_and_unready_meanwhile(settings: Settings) -> None:
    build_world(settings)
    with serve(settings) as client:
        state = client.app.state.service  # type: ignore[attr-defined]
        state.supervisor.min_backoff_s = 1.0
        follower = state.follower
        real_step = follower.step
        calls = {"n": 0}

        async def failing_step() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected follower bug")
            await real_step()

        follower.step = failing_step
        poll(lambda: client.get("/readyz").status_code == 503, "unready while restarting")
        assert client.get("/readyz").json()["status"] == "snapshot follower not running"
        # The last snapshot is still served meanwhile.
        assert client.post("/v1/score", json=body(0, [1, 2])).status_code == 200
        poll(lambda: client.get("/readyz").status_code == 200, "ready after restart", 10)
        assert state.supervisor.restarts == 1
        assert "freshrec_service_snapshot_follower_restarts_total 1.0" in client.get(
            "/metrics").text


def test_redis_outage_keeps_the_replica_ready(settings: Settings) -> None:
    """Unreachable Redis is not a dead follower: it retries, and the replica stays ready."""
    redis_port = free_port()
    local = LocalStack(external_kafka=settings.kafka_bootstrap, redis_port=redis_port).start()
    try:
        settings = settings.model_copy(update={"redis_url": local.redis_url})
        build_world(settings)
        with serve(settings) as client:
            local.stop()
            poll(lambda: not client.get("/v1/model").json()["redis_connected"], "disconnected")
            for _ in range(5):
                assert client.get("/readyz").status_code == 200
                assert client.post("/v1/score", json=body(0, [1])).status_code == 200
                time.sleep(0.3)
            assert client.app.state.service.supervisor.restarts == 0  # type: ignore[attr-defined]
    finally:
        local.stop()


@pytest.mark.parametrize("user", [None, "freshrec"])
def test_redis_credentials_in_the_url_work_and_never_show(
        settings: Settings, caplog: pytest.LogCaptureFixture, user: str | None) -> None:
    password = "p@ss:w/rd-" + os.urandom(6).hex()
    local = LocalStack(external_kafka=settings.kafka_bootstrap, redis_password=password).start()
    try:
        url = local.redis_url
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=local.redis_port).set("x", 1)  # no password: refused
        if user is not None:  # an ACL user (Redis 6+)
            admin = redis.Redis.from_url(url)
            admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*",
                                  "+@all")
            url = f"redis://{user}:{quote_pw(password)}@127.0.0.1:{local.redis_port}/0"
        settings = settings.model_copy(update={"redis_url": url})
        world = build_world(settings)  # the trainer's publisher, through the same URL
        caplog.set_level(logging.DEBUG)
        with serve(settings) as client:
            info = poll(lambda: (i := client.get("/v1/model").json())["redis_connected"] and i,
                        "connected through the password")
            assert info["version"] == world.publisher.confirmed_version
            assert client.post("/v1/score", json=body(0, [1, 2])).status_code == 200
            exposed = client.get("/v1/model").text + client.get("/metrics").text
        wrong = settings.model_copy(update={"redis_url": url.replace(quote_pw(password),
                                                                     "wrong")})
        with serve(wrong, wait_ready=False) as client:
            time.sleep(1.0)
            assert client.get("/readyz").status_code == 503
            exposed += client.get("/v1/model").text
        for text in (exposed, caplog.text, repr(settings)):
            assert password not in text and quote_pw(password) not in text
    finally:
        local.stop()


def quote_pw(password: str) -> str:
    return quote(password, safe="")


def test_dev_up_generates_prints_and_requires_a_token(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    env["FRESHREC_SERVICE_PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "freshrec.cli", "dev", "up", "--components", "service",
         "--kafka-port", str(free_port()), "--redis-port", str(free_port()),
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        token = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while token is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "dev up exited before printing the token"
            if line.startswith("events "):
                token = line.rsplit("Bearer ", 1)[1].strip()
        assert token and len(token) >= 16
        url = f"http://127.0.0.1:{port}/v1/events"
        event = dict(EVENT, ts=time.time())
        poll(lambda: _answers(url), "service up", 60, 0.2)
        assert httpx.post(url, json=event).status_code == 401
        assert httpx.post(url, json=event,
                          headers={"Authorization": f"Bearer {token}"}).status_code == 202
    finally:
        proc.terminate()
        proc.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.post(url, json={}).status_code == 401
    except httpx.HTTPError:
        return False
