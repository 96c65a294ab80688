"""Diag-LinUCB: equivalence with disjoint LinUCB, additivity, decay, dedup, publishing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bandit.diag_linucb import DiagLinUCB


def _random_events(rng: np.random.Generator, n: int, n_items: int, C: int, k: int):
    ids = rng.integers(0, n_items, n).astype(np.int64) * 1_000_003  # sparse, large IDs
    cl = np.stack([rng.choice(C, size=k, replace=False) for _ in range(n)]).astype(np.int64)
    w = rng.random((n, k)) + 0.05
    w /= w.sum(1, keepdims=True)
    r = (rng.random(n) < 0.3).astype(np.float64)
    ts = rng.uniform(0, 1000, n)
    return ids, cl, w, r, ts


def test_one_hot_contexts_equal_disjoint_linucb_with_matrix_inverse() -> None:
    rng = np.random.default_rng(0)
    C, n_items, lam = 5, 7, 0.7
    model = DiagLinUCB(C, lam=lam)
    A = {j: lam * np.eye(C) for j in range(n_items)}
    bvec = {j: np.zeros(C) for j in range(n_items)}
    for _ in range(300):
        j, c = int(rng.integers(n_items)), int(rng.integers(C))
        r = float(rng.random() < 0.2 + 0.1 * c)
        x = np.eye(C)[c]
        A[j] += np.outer(x, x)
        bvec[j] += r * x
        model.update(np.array([j]), np.array([[c]]), np.array([[1.0]]), np.array([r]), 0.0)
    for c in range(C):
        x = np.eye(C)[c]
        mean, bonus = model.score(np.arange(n_items), np.array([c]), np.array([1.0]))
        for j in range(n_items):
            Ainv = np.linalg.inv(A[j])
            assert mean[j] == pytest.approx(x @ Ainv @ bvec[j], abs=1e-12)
            assert bonus[j] == pytest.approx(np.sqrt(x @ Ainv @ x), abs=1e-12)


def test_batched_update_equals_one_event_at_a_time() -> None:
    rng = np.random.default_rng(1)
    ids, cl, w, r, ts = _random_events(rng, 200, 10, 8, 3)
    a, b = DiagLinUCB(8, half_life_s=300.0), DiagLinUCB(8, half_life_s=300.0)
    assert a.update(ids, cl, w, r, ts) == 200
    for i in range(200):
        b.update(ids[i : i + 1], cl[i : i + 1], w[i : i + 1], r[i : i + 1], ts[i : i + 1])
    q = np.unique(ids)
    for c in range(8):
        ma, ba = a.score(q, np.array([c]), np.array([1.0]), now=1000.0)
        mb, bb = b.score(q, np.array([c]), np.array([1.0]), now=1000.0)
        np.testing.assert_allclose(ma, mb, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ba, bb, rtol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_shards=st.integers(1, 4),
    half_life=st.sampled_from([0.0, 50.0, 400.0]),
    order_seed=st.integers(0, 1000),
)
def test_merge_of_shards_equals_sequential_updates_in_any_order(
    seed: int, n_shards: int, half_life: float, order_seed: int
) -> None:
    rng = np.random.default_rng(seed)
    C = 6
    ids, cl, w, r, ts = _random_events(rng, 120, 9, C, 2)
    whole = DiagLinUCB(C, lam=0.5, half_life_s=half_life)
    whole.update(ids, cl, w, r, ts)
    shard_of = rng.integers(0, n_shards, len(ids))
    shards = []
    for s in range(n_shards):
        m = DiagLinUCB(C, lam=0.5, half_life_s=half_life)
        sel = shard_of == s
        m.update(ids[sel], cl[sel], w[sel], r[sel], ts[sel])
        shards.append(m)
    order = np.random.default_rng(order_seed).permutation(n_shards)
    merged = DiagLinUCB(C, lam=0.5, half_life_s=half_life)
    for s in order:
        merged.merge(shards[s])
    assert len(merged) == len(whole)
    q = np.unique(ids)
    for c in range(C):
        mw, bw = whole.score(q, np.array([c]), np.array([1.0]), now=2000.0)
        mm, bm = merged.score(q, np.array([c]), np.array([1.0]), now=2000.0)
        np.testing.assert_allclose(mm, mw, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(bm, bw, rtol=1e-9, atol=1e-12)


def test_decay_halves_the_data_part_after_one_half_life_and_keeps_d_above_lambda() -> None:
    lam, h = 2.0, 100.0
    m = DiagLinUCB(3, lam=lam, half_life_s=h)
    m.update(np.array([5, 5, 5]), np.array([[1]] * 3), np.ones((3, 1)), np.ones(3), 0.0)
    d0, b0 = m.to_arrays()["d"][0, 1], m.to_arrays()["b"][0, 1]
    assert (d0 - lam, b0) == (3.0, 3.0)
    m.decay_to(h)
    arr = m.to_arrays()
    assert arr["d"][0, 1] - lam == pytest.approx(1.5)
    assert arr["b"][0, 1] == pytest.approx(1.5)
    m.decay_to(1e9)
    assert (m.to_arrays()["d"] >= lam).all()
    # lazy ageing at score time agrees with explicit decay
    m2 = DiagLinUCB(3, lam=lam, half_life_s=h)
    m2.update(np.array([5, 5, 5]), np.array([[1]] * 3), np.ones((3, 1)), np.ones(3), 0.0)
    mean, bonus = m2.score(np.array([5]), np.array([1]), np.array([1.0]), now=h)
    assert mean[0] == pytest.approx(1.5 / (lam + 1.5))
    assert bonus[0] == pytest.approx(np.sqrt(1 / (lam + 1.5)))


def test_out_of_order_events_enter_already_aged() -> None:
    m = DiagLinUCB(1, lam=1.0, half_life_s=10.0)
    m.update(np.array([1]), np.array([[0]]), np.ones((1, 1)), np.ones(1), 20.0)
    m.update(np.array([1]), np.array([[0]]), np.ones((1, 1)), np.ones(1), 10.0)
    assert m.to_arrays()["b"][0, 0] == pytest.approx(1.5)


def test_mean_and_bonus_match_the_closed_form_from_the_statistics() -> None:
    """mean = Σ w·b/d and bonus = sqrt(Σ w²/d) over the context's clusters, per item; so the
    α = 0 ranking is the ranking by that mean, computed here independently of score()."""
    rng = np.random.default_rng(3)
    ids, cl, w, r, ts = _random_events(rng, 500, 30, 6, 2)
    m = DiagLinUCB(6)
    m.update(ids, cl, w, r, ts)
    q = np.unique(ids)
    ctx, cw = np.array([0, 3]), np.array([0.7, 0.3])
    mean, bonus = m.score(q, ctx, cw)
    a = m.to_arrays()
    row = {int(i): j for j, i in enumerate(a["item_ids"])}
    d = np.stack([a["d"][row[int(i)], ctx] for i in q])
    b = np.stack([a["b"][row[int(i)], ctx] for i in q])
    np.testing.assert_allclose(mean, (cw * b / d).sum(1), rtol=1e-12)
    np.testing.assert_allclose(bonus, np.sqrt((cw * cw / d).sum(1)), rtol=1e-12)
    assert len(np.unique(mean)) > 10  # a ranking with something to order
    np.testing.assert_array_equal(np.argsort(-mean, kind="stable"),
                                  np.argsort(-(cw * b / d).sum(1), kind="stable"))


def test_unknown_items_get_the_prior_and_the_largest_bonus() -> None:
    m = DiagLinUCB(4, lam=0.5)
    m.update(np.array([1]), np.array([[0, 1]]), np.array([[0.5, 0.5]]), np.array([1.0]), 0.0)
    mean, bonus = m.score(np.array([1, 99]), np.array([0, 1]), np.array([0.5, 0.5]))
    assert mean[1] == 0.0
    assert bonus[1] == pytest.approx(np.sqrt(0.5 / 0.5))
    assert bonus[0] < bonus[1]


def test_duplicate_event_ids_are_not_applied_twice() -> None:
    m = DiagLinUCB(2, dedup_capacity=3)
    one = (np.array([1]), np.array([[0]]), np.ones((1, 1)), np.ones(1), 0.0)
    assert m.update(*one, event_ids=["a"]) == 1
    assert m.update(*one, event_ids=["a"]) == 0
    two = (np.array([1, 1]), np.array([[0], [0]]), np.ones((2, 1)), np.ones(2), 0.0)
    assert m.update(*two, event_ids=["b", "b"]) == 1  # duplicates inside one batch
    assert m.to_arrays()["b"][0, 0] == 2.0
    m.update(*two, event_ids=["c", "d"])  # window of 3 now holds b, c, d: "a" has rotated out
    assert m.update(*one, event_ids=["a"]) == 1
    assert m.update(*one, event_ids=["d"]) == 0


def test_changes_since_and_patch_rebuild_an_identical_view() -> None:
    rng = np.random.default_rng(4)
    trainer = DiagLinUCB(5, half_life_s=500.0)
    ids, cl, w, r, ts = _random_events(rng, 100, 20, 5, 2)
    trainer.update(ids[:50], cl[:50], w[:50], r[:50], np.sort(ts[:50]))
    view = DiagLinUCB.from_arrays(trainer.to_arrays())
    v = view.version
    trainer.update(ids[50:], cl[50:], w[50:], r[50:], np.sort(ts[50:]) + 1000)
    changed, d, b, v2 = trainer.changes_since(v)
    assert set(changed.tolist()) == set(np.unique(ids[50:]).tolist())
    view.patch(changed, d, b, v2, ts=trainer.clock)
    assert view.version == trainer.version == v2
    q = np.concatenate([np.unique(ids), [424242]])
    for now in (trainer.clock, trainer.clock + 300):
        a = trainer.score(q, np.array([1, 2]), np.array([0.6, 0.4]), now=now)
        b_ = view.score(q, np.array([1, 2]), np.array([0.6, 0.4]), now=now)
        np.testing.assert_allclose(a[0], b_[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a[1], b_[1], rtol=1e-10)
    assert trainer.changes_since(trainer.version)[0].size == 0


def test_arrays_round_trip_without_pickle(tmp_path) -> None:
    import json

    m = DiagLinUCB(3, lam=2.0, half_life_s=60.0, dedup_capacity=10)
    m.update(np.array([9, 8]), np.array([[0], [2]]), np.ones((2, 1)), np.ones(2), 5.0, ["x", "y"])
    np.savez(tmp_path / "b.npz", **m.to_arrays())
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z:
        back = DiagLinUCB.from_arrays(dict(z))
    assert json.loads(json.dumps(m.metadata())) == back.metadata()
    assert len(back) == 2 and 9 in back and 7 not in back
    assert back.update(np.array([9]), np.array([[0]]), np.ones((1, 1)), np.ones(1), 6.0, ["x"]) == 0
    assert back.nbytes > 0


def test_bad_inputs_are_rejected_before_anything_changes() -> None:
    m = DiagLinUCB(2)
    with pytest.raises(ValueError):
        m.update(np.array([1]), np.array([[2]]), np.ones((1, 1)), np.ones(1), 0.0, ["e"])
    assert len(m) == 0 and m.version == 0
    assert m.update(np.array([1]), np.array([[1]]), np.ones((1, 1)), np.ones(1), 0.0, ["e"]) == 1


def test_evicted_items_lose_their_statistics_and_others_keep_theirs() -> None:
    m = DiagLinUCB(n_clusters=4)
    ids = np.array([10, 20, 30, 20], dtype=np.int64)
    m.update(ids, np.zeros((4, 1), dtype=np.int64), np.ones((4, 1)), np.array([1.0, 0, 1, 1]),
             ts=np.arange(4.0))
    before = m.score(np.array([10, 30], dtype=np.int64), np.array([0]), np.array([1.0]))
    version = m.version
    assert m.evict(np.array([20, 99], dtype=np.int64)) == 1
    assert len(m) == 2 and 20 not in m and 10 in m and 30 in m
    after = m.score(np.array([10, 30], dtype=np.int64), np.array([0]), np.array([1.0]))
    np.testing.assert_allclose(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1])
    assert m.version > version
    fresh = m.score(np.array([20], dtype=np.int64), np.array([0]), np.array([1.0]))
    assert fresh[0][0] == 0.0  # scored from the prior again
