"""The serving ID -> vector store against a dict reference, and its prepare/commit contract."""

from __future__ import annotations

import numpy as np

from service.vectors import SlotVectors


def reference_items(ref: dict[int, np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(ref), dtype=np.int64)
    vecs = np.array([ref[i] for i in ids.tolist()], dtype=np.float32).reshape(len(ids), dim)
    return ids, vecs


def test_random_upserts_and_deletions_match_a_dict() -> None:
    rng = np.random.default_rng(0)
    dim = 3
    universe = rng.integers(-(2**62), 2**62, size=400)
    ids = rng.choice(universe, size=150)  # duplicates on purpose: the last one wins
    vecs = rng.normal(size=(150, dim)).astype(np.float32)
    sv = SlotVectors.build(dim, ids, vecs)
    ref = {int(i): v for i, v in zip(ids.tolist(), vecs, strict=True)}
    for _ in range(60):
        up = rng.choice(universe, size=rng.integers(0, 40))
        uv = rng.normal(size=(len(up), dim)).astype(np.float32)
        dl = rng.choice(universe, size=rng.integers(0, 40))
        sv.apply(up, uv, dl)
        for i, v in zip(up.tolist(), uv, strict=True):
            ref[i] = v
        for i in set(dl.tolist()):
            ref.pop(i, None)
        got_ids, got_vecs = sv.items()
        want_ids, want_vecs = reference_items(ref, dim)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_vecs, want_vecs)
        probe = rng.choice(universe, size=50)
        want = np.array([ref.get(i, np.zeros(dim)) for i in probe.tolist()], np.float32)
        np.testing.assert_array_equal(sv.lookup(probe), want)
        np.testing.assert_array_equal(sv.vector(int(probe[0])), want[0])
    # Rows are recycled: the matrix holds about the live rows plus one change, not the history.
    assert sv.state.matrix.shape[0] <= 2 * (len(universe) + 1024)


def test_a_prepared_change_leaves_the_current_state_intact_until_committed() -> None:
    sv = SlotVectors.build(2, np.array([1, 2, 3]), np.ones((3, 2), np.float32))
    before = sv.state
    change = sv.prepare(np.array([2, 9]), np.full((2, 2), 5.0, np.float32), np.array([3]))
    # Readers of the current state see exactly the old rows while the change is prepared.
    np.testing.assert_array_equal(before.matrix[before.rows(np.array([1, 2, 3, 9]))],
                                  [[1, 1], [1, 1], [1, 1], [0, 0]])
    assert sv.state is before
    sv.commit(change)
    np.testing.assert_array_equal(sv.lookup(np.array([1, 2, 3, 9])),
                                  [[1, 1], [5, 5], [0, 0], [5, 5]])
    # An ID both upserted and deleted in one change ends deleted.
    sv.apply(np.array([4]), np.ones((1, 2), np.float32), np.array([4]))
    assert 4 not in sv.items()[0]
