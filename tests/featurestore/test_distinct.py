"""Distinct examples of a jagged batch, and taking examples out of one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore.distinct import _bags_equal, distinct_examples, take_examples
from featurestore.featurize import SlotIds, SparseBatch


def _batch(bags: dict[str, list[list[int]]]) -> SparseBatch:
    slots = {}
    for name, rows in bags.items():
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        slots[name] = SlotIds(np.array([i for r in rows for i in r], dtype=np.int64), offsets)
    return SparseBatch(len(next(iter(bags.values()))), slots)


def _rows(batch: SparseBatch, i: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(s.ids[s.offsets[i]:s.offsets[i + 1]].tolist())
                 for s in batch.slots.values())


bags = st.lists(st.lists(st.integers(-3, 3), max_size=3), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_groups_are_exactly_the_examples_with_equal_ids(data) -> None:
    user = data.draw(bags)
    age = data.draw(st.lists(st.lists(st.integers(0, 2), max_size=2),
                             min_size=len(user), max_size=len(user)))
    batch = _batch({"user": user, "age": age})
    first, inverse = distinct_examples(batch)
    rows = [_rows(batch, i) for i in range(batch.size)]
    expected = list(dict.fromkeys(rows))  # distinct rows in order of first occurrence
    assert [rows[i] for i in first] == expected
    assert [expected[g] for g in inverse] == rows
    taken = take_examples(batch, first)
    assert [_rows(taken, i) for i in range(taken.size)] == expected


def test_a_bag_split_differently_is_another_example() -> None:
    """[1, 2] + [] is not [1] + [2]: the bag lengths are part of an example."""
    batch = _batch({"a": [[1, 2], [1]], "b": [[], [2]]})
    first, inverse = distinct_examples(batch)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1]


def test_a_wrong_grouping_is_caught_id_by_id() -> None:
    """What a hash collision would produce (two different bags in one group) fails the
    check that makes distinct_examples fall back to no grouping."""
    s = _batch({"a": [[5], [6], [5]]}).slots["a"]
    assert _bags_equal(s.ids, s.offsets, np.array([0, 1]), np.array([0, 1, 0]))
    assert not _bags_equal(s.ids, s.offsets, np.array([0]), np.array([0, 0, 0]))
