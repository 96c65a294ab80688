"""The dedup window of recently applied event ids."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bandit.recent_ids import RecentIds


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 6), st.lists(st.lists(st.sampled_from("abcdefghij"), max_size=5),
                                   max_size=12))
def test_new_ids_are_admitted_once_and_the_newest_capacity_are_never_forgotten(
        capacity: int, batches: list[list[str]]) -> None:
    window = RecentIds(capacity)
    remembered: list[str] = []  # every admitted id, oldest first
    largest = 0  # the largest batch of admitted ids so far
    for batch in batches:
        held = set(window)
        keep = window.admit(batch)
        expected, earlier = [], set()
        for e in batch:
            expected.append(e not in held and e not in earlier)
            earlier.add(e)
        assert keep.tolist() == expected
        fresh = [e for e, k in zip(batch, keep, strict=True) if k]
        remembered += fresh
        largest = max(largest, len(fresh))
        # The newest ids, oldest first; at least `capacity` of them, at most one batch more.
        assert list(window) == remembered[len(remembered) - len(window):]
        assert len(window) >= min(capacity, len(remembered))
        assert len(window) < capacity + largest or not remembered
        assert all(e in window for e in remembered[len(remembered) - capacity:] if capacity)
