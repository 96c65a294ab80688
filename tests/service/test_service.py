"""The scoring service against a real Redis and a real broker, uvicorn on a free loopback port.

The state is built in-process (tables, dense model, bandit statistics, centroids), published by
the real :class:`trainer.publisher.Publisher`, and every served number is checked against a
reference computed from that same in-process state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis
import uvicorn

from bandit.clusters import OnlineKMeans
from bandit.context import context_for, user_tower
from bandit.diag_linucb import DiagLinUCB
from featurestore.events import Impression
from featurestore.featurize import Featurizer, encode_value, event_record
from featurestore.schema import ModelConfig, SlotSide, load_model_config
from featurestore.snapshot_buckets import BucketedStore
from featurestore.table import TableSet
from freshrec.devstack import free_port
from freshrec.redis_client import redis_client
from freshrec.redis_cluster import LocalRedisCluster
from freshrec.settings import Settings
from service.app import create_app
from tests.integration.kafka_helpers import read_topic
from trainer.learner import OnlineLearner
from trainer.publisher import PublishableState, Publisher, snapshot_store

pytestmark = pytest.mark.integration

USERS = [f"u{i}" for i in range(20)]
ITEMS = [f"m{i}" for i in range(60)]


def user_features(i: int) -> dict:
    return {"age": 18 + 3 * i, "gender": "MF"[i % 2], "occupation": f"o{i % 5}"}


def item_features(j: int) -> dict:
    return {"genres": ["Action", "Drama", "Comedy"][: 1 + j % 3], "release_year": 1960 + j}


@dataclass
class World:
    """An in-process trainer state, its publisher, and a reference scorer over it."""

    config: ModelConfig
    state: PublishableState
    clusters: OnlineKMeans
    publisher: Publisher
    settings: Settings

    def reference(self, user: int, items: list[int], explore: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(pctr, bonus) exactly as the trainer computes them from its own tables: the
        learner's own pooling, wide kernel and torch model (the service has its own gather,
        the shared pooling kernel and a numpy forward)."""
        recs = [event_record(USERS[user], ITEMS[j], {**user_features(user), **item_features(j)})
                for j in items]
        learner = OnlineLearner(self.config, threads=None)
        learner.tables, learner.model = self.state.tables, self.state.model
        pctr = learner.predict(recs)
        uvec = _towers(self.config, self.state.tables, [user])
        cl, w = context_for(uvec, self.clusters.centroids, self.settings.bandit_top_k,
                            counts=self.clusters.counts)
        _, bonus = self.state.bandit.score(
            np.array([encode_value(ITEMS[j]) for j in items]), cl[0], w[0],
            now=self.state.bandit.clock)
        return pctr, bonus


def _towers(config: ModelConfig, tables: TableSet, users: list[int]) -> np.ndarray:
    """The users' towers (every user-side slot pooled) from the trainer's tables."""
    recs = [event_record(USERS[i], "", user_features(i)) for i in users]
    batch = Featurizer(config).featurize(recs, SlotSide.USER)
    return user_tower(config, batch, lambda s, ids: tables[s].gather(tables[s].find(ids)))


def build_world(settings: Settings, seed: int = 0) -> World:
    config = load_model_config(settings.model_config_path)
    # A trained learner (not fresh tables): biases, factors and dense weights all matter.
    learner = OnlineLearner(config, seed=seed, threads=None)
    recs = [event_record(USERS[i], ITEMS[j], {**user_features(i), **item_features(j)})
            for i in range(len(USERS)) for j in range(0, len(ITEMS) - 10)]  # last 10 unknown
    labels = (np.random.default_rng(seed).random(len(recs)) < 0.3).astype(np.float64)
    for _ in range(2):  # zip has min_count 2
        learner.step(recs, labels, np.ones(len(recs)))
    tables = learner.tables
    uvecs = _towers(config, tables, list(range(len(USERS))))
    clusters = OnlineKMeans(8, uvecs.shape[1], seed=seed)
    clusters.partial_fit(uvecs)
    bandit = DiagLinUCB(settings.bandit_clusters, lam=settings.bandit_lambda)
    rng = np.random.default_rng(seed)
    cl, w = context_for(uvecs, clusters.centroids, settings.bandit_top_k, counts=clusters.counts)
    for _ in range(5):
        u = rng.integers(len(USERS), size=200)
        it = rng.integers(len(ITEMS) - 20, size=200)
        bandit.update(np.array([encode_value(ITEMS[j]) for j in it]), cl[u], w[u],
                      rng.random(200) < 0.3, 10.0)
    state = PublishableState(config, tables, learner.model, bandit,
                             lambda: (clusters.centroids, clusters.counts))
    publisher = Publisher(snapshot_store(settings, redis_client(settings)), state, settings)
    publisher.publish_full()
    return World(config, state, clusters, publisher, settings)


@contextmanager
def serve(settings: Settings, wait_ready: bool = True, **app_options: Any
          ) -> Iterator[httpx.Client]:
    """A service replica on a free port in a thread; yields a client pointed at it.
    ``app_options`` go to ``create_app``."""
    port = free_port()
    app = create_app(settings, **app_options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0)
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started
        if wait_ready:
            poll(lambda: client.get("/readyz").status_code == 200, "service ready")
        client.app = app  # type: ignore[attr-defined]
        yield client
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)


def poll(cond, what: str, timeout: float = 15.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def body(user: int, items: list[int], top_k: int | None = None, explore: bool = True) -> dict:
    return {"user_id": USERS[user], "features": user_features(user), "explore": explore,
            "top_k": top_k or len(items),
            "candidates": [{"item_id": ITEMS[j], "features": item_features(j)} for j in items]}


def served(resp: httpx.Response) -> dict[str, dict]:
    assert resp.status_code == 200, resp.text
    return {it["item_id"]: it for it in resp.json()["items"]}


TOKEN = "test-client-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---- tests ------------------------------------------------------------------------------------


def test_served_scores_equal_the_in_process_reference(settings: Settings) -> None:
    world = build_world(settings)
    items = list(range(0, 60, 2))  # includes unknown items m50..m58
    with serve(settings) as client:
        for user in (0, 7, 13):
            out = served(client.post("/v1/score", json=body(user, items)))
            pctr, bonus = world.reference(user, items)
            got_p = np.array([out[ITEMS[j]]["pctr"] for j in items])
            got_b = np.array([out[ITEMS[j]]["bonus"] for j in items])
            np.testing.assert_allclose(got_p, pctr, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got_b, bonus, rtol=1e-6, atol=1e-9)
            scores = [it["score"] for it in out.values()]
            assert scores == sorted(scores, reverse=True)
            for it in out.values():
                want = it["pctr"] + settings.bandit_alpha * it["bonus"]
                assert it["score"] == pytest.approx(want)
        # Without exploration the ranking is by pCTR and nothing is marked explored.
        out = client.post("/v1/score", json=body(3, items, top_k=5, explore=False)).json()
        assert len(out["items"]) == 5
        assert all(it["bonus"] == 0 and not it["explored"] for it in out["items"])
        pctr, _ = world.reference(3, items)
        assert [it["item_id"] for it in out["items"]] == [ITEMS[items[i]]
                                                          for i in np.argsort(-pctr)[:5]]
        info = client.get("/v1/model").json()
        assert info["version"] == world.publisher.confirmed_version
        assert info["table_sizes"]["item"] == len(world.state.tables["item"])
        assert "freshrec_service_request_seconds_bucket" in client.get("/metrics").text


def test_a_bucketed_model_on_a_redis_cluster_serves_the_in_process_reference(
        settings: Settings, redis_cluster: LocalRedisCluster) -> None:
    settings = settings.model_copy(update={"redis_url": redis_cluster.url,
                                           "snapshot_buckets": 8})
    world = build_world(settings)
    assert isinstance(world.publisher.store, BucketedStore)
    items = list(range(0, 60, 3))
    with serve(settings) as client:
        out = served(client.post("/v1/score", json=body(5, items)))
        pctr, bonus = world.reference(5, items)
        np.testing.assert_allclose([out[ITEMS[j]]["pctr"] for j in items], pctr,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([out[ITEMS[j]]["bonus"] for j in items], bonus,
                                   rtol=1e-6, atol=1e-9)
        info = client.get("/v1/model").json()
        assert info["version"] == world.publisher.confirmed_version
        assert info["table_sizes"]["item"] == len(world.state.tables["item"])


def test_explored_marks_items_that_only_the_bonus_put_in_the_top_k(settings: Settings) -> None:
    settings = settings.model_copy(update={"bandit_alpha": 5.0})
    world = build_world(settings)
    items = list(range(40, 60))  # mostly low-count and unknown items: large bonuses
    with serve(settings) as client:
        out = client.post("/v1/score", json=body(1, items, top_k=5)).json()["items"]
    pctr, _ = world.reference(1, items)
    top_by_pctr = {ITEMS[items[i]] for i in np.argsort(-pctr, kind="stable")[:5]}
    for it in out:
        assert it["explored"] == (it["item_id"] not in top_by_pctr)


def test_a_delta_changes_the_served_score_and_a_late_replica_serves_the_same_version(
        settings: Settings) -> None:
    world = build_world(settings)
    table = world.state.tables["item"]
    with serve(settings) as client:
        before = served(client.post("/v1/score", json=body(2, [5, 55])))
        # Train-like change: new row for a brand-new item, move an existing one, delete one.
        table.lookup(np.array([encode_value("m55")]), 2.0)
        rows = table.find(np.array([encode_value("m5")]))
        table.apply_gradients(rows, np.full((1, table.config.dim), 3.0, dtype=np.float32))
        table.apply_gradients(table.find(np.array([encode_value("m55")])),
                              np.full((1, table.config.dim), -3.0, dtype=np.float32))
        assert world.publisher.maybe_publish(time.monotonic() + 1)
        after = poll(lambda: (r := served(client.post("/v1/score", json=body(2, [5, 55]))))
                     and r["m5"]["pctr"] != before["m5"]["pctr"] and r, "delta applied")
        pctr, _ = world.reference(2, [5, 55])
        assert after["m5"]["pctr"] == pytest.approx(pctr[0], rel=1e-5)
        assert after["m55"]["pctr"] == pytest.approx(pctr[1], rel=1e-5)
        version = client.get("/v1/model").json()["version"]
        assert version == world.publisher.confirmed_version
        # A replica started now loads from Redis alone and serves the same thing.
        with serve(settings) as late:
            assert late.get("/v1/model").json()["version"] == version
            again = served(late.post("/v1/score", json=body(2, [5, 55])))
            assert again["m5"]["pctr"] == pytest.approx(after["m5"]["pctr"], rel=1e-6)
        # Deletion (expiry) reaches the replica: the item scores with a zero embedding.
        table.sweep_expired(1e12)
        assert world.publisher.maybe_publish(time.monotonic() + 2)
        poll(lambda: client.get("/v1/model").json()["table_sizes"]["item"] == 0, "deletions")


def test_flushall_republishes_and_the_service_keeps_serving_meanwhile(
        settings: Settings, redis_client: redis.Redis) -> None:
    world = build_world(settings)
    with serve(settings) as client:
        v0 = client.get("/v1/model").json()
        gen0 = v0["generation"]
        redis_client.flushall()
        # Redis lost everything: the replica keeps serving its last snapshot and stays ready.
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/score", json=body(0, [1, 2, 3])).status_code == 200
        # The publisher's next cycle notices (meta gone) and republishes a full snapshot.
        table = world.state.tables["item"]
        table.apply_gradients(table.find(np.array([encode_value("m1")])),
                              np.ones((1, table.config.dim), dtype=np.float32))
        assert world.publisher.maybe_publish(time.monotonic() + 10)
        assert redis_client.exists(f"fr:{{{settings.model_name}}}:meta")
        info = poll(lambda: (i := client.get("/v1/model").json())["generation"] != gen0 and i,
                    "full reload after FLUSHALL")
        assert info["version"] > v0["version"]
        pctr, _ = world.reference(0, [1])
        assert served(client.post("/v1/score", json=body(0, [1])))["m1"]["pctr"] == (
            pytest.approx(pctr[0], rel=1e-5))


def test_not_ready_until_a_snapshot_exists(settings: Settings) -> None:
    with serve(settings, wait_ready=False) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/score", json=body(0, [1])).status_code == 503
        build_world(settings)
        poll(lambda: client.get("/readyz").status_code == 200, "ready after first publish")


def test_invalid_requests_get_4xx_naming_the_field(settings: Settings) -> None:
    settings = settings.model_copy(update={"service_max_candidates": 5,
                                           "service_max_body_bytes": 20_000,
                                           "service_api_token": TOKEN})
    build_world(settings)

    def locs(resp: httpx.Response) -> list[list]:
        return [d["loc"] for d in resp.json()["detail"]]

    with serve(settings) as client:
        good = body(0, [1, 2])
        r = client.post("/v1/score", json={k: v for k, v in good.items() if k != "user_id"})
        assert r.status_code == 422 and ["body", "user_id"] in locs(r)
        r = client.post("/v1/score", json=body(0, list(range(6))))
        assert r.status_code == 422 and ["body", "candidates"] in locs(r)
        r = client.post("/v1/score", json=dict(good, top_k="many"))
        assert r.status_code == 422 and ["body", "top_k"] in locs(r)
        r = client.post("/v1/score", json=dict(good, candidates=[{"item_id": 3}]))
        assert r.status_code == 422 and any(loc[:2] == ["body", "candidates"] for loc in locs(r))
        r = client.post("/v1/score", content=b"{not json", headers={"content-type":
                                                                    "application/json"})
        assert r.status_code == 422
        big = dict(good, features={"x": "y" * 100} | {f"k{i}": "v" * 100 for i in range(60)},
                   candidates=[{"item_id": "m1", "features": {"a": "b" * 128} | {
                       f"f{i}": "z" * 128 for i in range(50)}}] * 4)
        r = client.post("/v1/score", json=big)
        assert r.status_code == 413 and r.json()["detail"][0]["loc"] == ["body"]

        def chunks():
            yield orjson.dumps(big)

        r = client.post("/v1/score", content=chunks(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413
        event = {"event_id": "e1", "ts": 1.0, "user_id": "u1", "item_id": "m1", "label": 1}
        assert client.post("/v1/events", json=event).status_code == 401
        r = client.post("/v1/events", json=event, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        r = client.post("/v1/events", json=dict(event, label=3),
                        headers=AUTH)
        assert r.status_code == 422 and any("label" in loc for loc in locs(r))
        metrics = client.get("/metrics").text
        assert 'freshrec_service_responses_total{route="/v1/score",status="422"}' in metrics


def test_impressions_and_events_reach_kafka(settings: Settings) -> None:
    settings = settings.model_copy(update={"service_api_token": TOKEN})
    build_world(settings)
    with serve(settings) as client:
        out = client.post("/v1/score", json=dict(body(4, [1, 2, 3, 55], top_k=3),
                                                 request_id="req-1")).json()
        assert out["request_id"] == "req-1"
        events = [{"event_id": f"e{i}", "ts": 100.0 + i, "user_id": USERS[i], "item_id": "m1",
                   "label": i % 2, "features": user_features(i)} for i in range(3)]
        assert client.post("/v1/events", json=events[0], headers=AUTH).status_code == 202
        r = client.post("/v1/events", json=events[1:], headers=AUTH)
        assert r.status_code == 202 and r.json() == {"accepted": 2}
    # Leaving the context shut the service down, which flushed its producer.
    msgs = read_topic(settings.kafka_bootstrap, settings.topic_impressions, 1)
    assert len(msgs) == 1
    imp = Impression.model_validate_json(msgs[0].value())
    assert msgs[0].key() == USERS[4].encode()
    assert imp.request_id == "req-1" and imp.user_id == USERS[4]
    assert [it.item_id for it in imp.items] == [it["item_id"] for it in out["items"]]
    assert [it.position for it in imp.items] == [0, 1, 2]
    assert imp.items[0].features and imp.context is not None
    assert imp.model_version == out["model_version"]
    got = read_topic(settings.kafka_bootstrap, settings.topic_events, 3)
    assert sorted(orjson.loads(m.value())["event_id"] for m in got) == ["e0", "e1", "e2"]
    assert {m.key() for m in got} == {u.encode() for u in USERS[:3]}


def test_openapi_fuzzing_finds_no_server_errors(settings: Settings) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings

    build_world(settings)
    with serve(settings) as client:
        schema = schemathesis.openapi.from_url(f"{client.base_url}/openapi.json")
        failures: list[tuple] = []

        def check_operation(operation) -> None:
            @hsettings(max_examples=25, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy())
            def check(case) -> None:
                resp = case.call()
                if resp.status_code >= 500:
                    failures.append((operation.label, resp.status_code, resp.text[:200]))

            check()

        for op in schema.get_all_operations():
            check_operation(op.ok())
        assert not failures, failures[:5]
