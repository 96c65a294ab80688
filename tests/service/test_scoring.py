"""The service's fast paths agree with the reference code they replace.

Pooling over the snapshot's rows equals ``featurestore.pooling.mean_pool`` over the looked-up
vectors exactly (one kernel; served pCTRs equal the trainer's in tests/service/test_service.py);
the orjson body parse returns exactly what the pydantic ``ScoreRequest`` does, or leaves the
body to it; the bulk histogram update equals one ``observe`` per value."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from featurestore.featurize import Featurizer, SlotIds
from featurestore.pooling import mean_pool
from featurestore.schema import SlotSide, load_model_config
from freshrec.settings import default_model_config_path
from service.candidates import CandidateIds
from service.schemas import ParsedScore, ScoreRequest, parse_score_body
from service.scoring import pool_into, rank
from service.vectors import SlotVectors


def test_pool_into_equals_mean_pool_with_empty_bags_and_unknown_ids() -> None:
    rng = np.random.default_rng(0)
    store = SlotVectors.build(8, np.arange(100, 150), rng.normal(size=(50, 8)).astype(np.float32))
    lengths = np.array([0, 1, 3, 0, 2, 5, 1, 0])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(90, 160, size=int(offsets[-1]))  # some unknown -> zero rows
    for s in (SlotIds(ids, offsets), SlotIds(ids[:4], np.arange(5)),
              SlotIds(np.empty(0, np.int64), np.zeros(4, np.int64))):
        out = np.full((len(s.offsets) - 1, 8), np.nan, dtype=np.float32)
        pool_into(out, 0, store, s)
        np.testing.assert_array_equal(out, mean_pool(store.lookup(s.ids), s.offsets))


def _table(**bounds: int) -> CandidateIds:
    config = load_model_config(default_model_config_path())
    return CandidateIds(Featurizer(config),
                        [s.name for s in config.slots if s.side is SlotSide.ITEM], **bounds)


def _via_pydantic(body: dict) -> ParsedScore | str:
    try:
        req = ScoreRequest.model_validate_json(orjson.dumps(body))
    except ValidationError:
        return "invalid"
    return ParsedScore(req.user_id, req.features,
                       [(c.item_id, c.features) for c in req.candidates], req.top_k,
                       req.explore, req.request_id, [])


@pytest.mark.parametrize("change", [
    {}, {"features": {}}, {"top_k": 3, "explore": False, "request_id": "r1"},
    {"features": {"age": 3.0}}, {"features": {"flag": True}}, {"features": {"n": 1 << 63}},
    {"features": {"x": 1.5, "g": ["a", "b"], "n": -(1 << 63)}}, {"features": {"g": [1]}},
    {"features": {"k" * 65: 1}}, {"user_id": ""}, {"user_id": 7}, {"top_k": 0},
    {"top_k": True}, {"explore": 1}, {"request_id": None}, {"extra": 1}, {"candidates": []},
    {"candidates": [{"item_id": "m1", "features": {"year": 1999.0}}]},
    {"candidates": [{"item_id": "m1", "other": 1}]}, {"candidates": [{"item_id": "m1"}]},
])
def test_fast_body_parse_agrees_with_the_pydantic_model(change: dict) -> None:
    body = {"user_id": "u1", "features": {"age": 31, "zip": "94"},
            "candidates": [{"item_id": f"m{j}", "features": {"genres": ["Drama"], "year": j}}
                           for j in range(3)]} | change
    want = _via_pydantic(body)
    table = _table()
    if want == "invalid":
        with pytest.raises(RequestValidationError):
            parse_score_body(orjson.dumps(body), table)
        assert len(table) == 0  # nothing of an invalid body is kept
    else:
        got = parse_score_body(orjson.dumps(body), table)
        assert got._replace(rows=[]) == want
        assert [table.items[r] for r in got.rows] == got.items
        # Parsed again, the candidates are found in the table and skip the checks: same result.
        assert parse_score_body(orjson.dumps(body), table) == got
        assert [type(v) for v in got.features.values()] == [
            type(v) for v in want.features.values()]


def test_a_table_that_starts_over_keeps_every_candidate_of_the_request() -> None:
    """A full table restarts mid-request: rows found before the restart are stale, so every
    candidate of the request (found or new) must come back at a row holding it."""
    table = _table(capacity=8)
    for n in range(12):
        cands = [{"item_id": f"m{(n * 3 + j) % 20}", "features": {"release_year": j}}
                 for j in range(5)]
        got = parse_score_body(orjson.dumps({"user_id": "u1", "candidates": cands}), table)
        assert got.items == [(c["item_id"], c["features"]) for c in cands]
        assert [table.items[r] for r in got.rows] == got.items
        assert len(table) <= 8


def test_the_table_bounds_its_key_bytes_on_the_body_path() -> None:
    table = _table(max_key_bytes=1_000)
    for i in range(50):
        cands = [{"item_id": f"m{i}", "features": {"g": ["x" * 100]}}]
        got = parse_score_body(orjson.dumps({"user_id": "u1", "candidates": cands}), table)
        assert table.items[got.rows[0]] == (f"m{i}", {"g": ["x" * 100]})
        assert sum(map(len, table.rows)) <= 1_000


def test_the_histogram_tally_equals_one_observe_per_value() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from freshrec.metrics import HistogramTally

    values = [0.0, 0.01, 0.015, 0.02, 0.5, 1.0, 3.0, -1.0, 0.02000001, 100.0]
    bounds = (0.01, 0.02, 0.05, 1.0)
    direct = Histogram("h", "h", buckets=bounds, registry=(r1 := CollectorRegistry()))
    tallied = Histogram("h", "h", buckets=bounds, registry=(r2 := CollectorRegistry()))
    tally = HistogramTally(tallied)
    for v in values:
        direct.observe(v)
        tally.observe(v)
    assert r2.get_sample_value("h_count") == 0  # nothing written before the flush
    tally.flush()
    tally.flush()  # a second flush adds nothing

    def samples(r: CollectorRegistry) -> list:
        return [(s.name, s.labels, s.value) for m in r.collect() for s in m.samples
                if not s.name.endswith("_created")]

    assert samples(r2) == samples(r1)


def test_scored_requests_reach_the_exposition() -> None:
    from freshrec.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.scored.add(100, 20, 3, 0.05)
    metrics.scored.add(50, 10, 0, None)
    text = metrics.exposition().decode()
    assert "freshrec_service_served_items_total 30.0" in text
    assert "freshrec_service_explored_items_total 3.0" in text
    assert "freshrec_service_candidates_count 2.0" in text
    assert "freshrec_service_exploration_bonus_count 1.0" in text


def test_pooling_candidates_from_the_table_equals_gathering_then_pooling() -> None:
    from featurestore.featurize import Featurizer
    from featurestore.schema import SlotSide, load_model_config
    from freshrec.settings import default_model_config_path
    from service.candidates import CandidateIds
    from service.scoring import pool_candidates

    config = load_model_config(default_model_config_path())
    table = CandidateIds(Featurizer(config),
                         [s.name for s in config.slots if s.side is SlotSide.ITEM])
    items = [(f"m{j}", {"genres": ["Drama", "Comedy", "Horror"][: j % 4], "release_year": j})
             for j in range(30)]
    keys = [orjson.dumps(i) for i in items]
    rows = table.table_rows(keys, items)[::-1].copy()  # any order, repeats allowed
    rng = np.random.default_rng(1)
    for slot, column in table.columns.items():
        ids = column.gather(rows)
        known = np.unique(ids.ids)[::2]  # half the IDs unknown to the store
        store = SlotVectors.build(8, known, rng.normal(size=(len(known), 8)).astype(np.float32))
        want = np.full((len(rows), 8), np.nan, dtype=np.float32)
        got = want.copy()
        pool_into(want, 0, store, ids)
        pool_candidates(got, 0, store, column, rows)
        np.testing.assert_array_equal(got, want, err_msg=slot)


def test_ranking_marks_items_shown_only_thanks_to_the_bonus() -> None:
    pctr = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    score = pctr + np.array([0.0, 0.0, 0.0, 1.0, 0.9, 0.0])  # items 3 and 4 lifted by the bonus
    order, explored = rank(pctr, score, 3, exploring=True)
    assert order.tolist() == [3, 4, 0] and explored.tolist() == [True, True, False]
    order, explored = rank(pctr, score, 3, exploring=False)
    assert order.tolist() == [3, 4, 0] and not explored.any()  # the score ranks; nothing flagged


@pytest.mark.parametrize("cap", [0, 1, 2, 3, None])
def test_a_bound_on_explored_items_gives_places_back_to_the_best_pctr(cap: int | None) -> None:
    pctr = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    score = pctr + np.array([0.0, 0.0, 0.0, 1.0, 0.9, 0.0])
    order, explored = rank(pctr, score, 3, exploring=True, max_explored=cap)
    expected = {0: [0, 1, 2], 1: [3, 0, 1], 2: [3, 4, 0], 3: [3, 4, 0], None: [3, 4, 0]}[cap]
    assert order.tolist() == expected
    assert explored.sum() == min(2, 2 if cap is None else cap)


def test_bounded_rankings_hold_their_bound_on_random_scores() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        k = int(rng.integers(1, n + 1))
        cap = int(rng.integers(0, k + 1))
        pctr = rng.random(n)
        score = pctr + rng.random(n) * rng.choice([0.0, 0.5, 2.0])
        order, explored = rank(pctr, score, k, exploring=True, max_explored=cap)
        free, _ = rank(pctr, score, k, exploring=True)
        by_pctr = set((-pctr).argsort(kind="stable")[:k].tolist())
        assert len(order) == k and len(set(order.tolist())) == k
        assert explored.sum() <= cap
        assert explored.tolist() == [i not in by_pctr for i in order.tolist()]
        assert np.all(np.diff(score[order]) <= 0)  # still ranked by score
        # The explored items kept are the best-scored of the unbounded ranking's explored ones.
        free_explored = [i for i in free.tolist() if i not in by_pctr][:cap]
        assert sorted(i for i in order.tolist() if i not in by_pctr) == sorted(free_explored)


def test_the_service_takes_its_bound_on_explored_items_from_the_settings() -> None:
    from freshrec.settings import Settings
    from service.app import create_app

    assert create_app(Settings()).state.service.scorer.max_explored is None
    app = create_app(Settings(bandit_max_explored=1))
    assert app.state.service.scorer.max_explored == 1
