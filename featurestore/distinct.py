"""Distinct examples of a jagged batch: group the examples whose IDs are equal in every slot.

Work that depends only on some slots (the user tower depends only on the user-side slots) is
the same for every example that shares those slots' IDs, and real streams repeat them within a
batch: one request shows several items to one user, and a session yields several events. So
such work runs once per distinct example and is broadcast back with ``inverse``.

Grouping hashes each example's bags, then checks every example against its group's first
example ID by ID: a 64-bit hash collision cannot merge two different examples (the batch is
then left ungrouped, which is correct, only slower).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from featurestore.featurize import SlotIds, SparseBatch


@njit(cache=True)
def _hash_bags(h: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> None:
    """Fold each example's bag (its length, then its IDs in order) into ``h[i]``."""
    mix = np.uint64(0x9E3779B97F4A7C15)
    for i in range(h.shape[0]):
        a, b = offsets[i], offsets[i + 1]
        x = h[i] ^ np.uint64(b - a)
        x *= mix
        for j in range(a, b):
            x ^= np.uint64(ids[j])
            x *= mix
            x ^= x >> np.uint64(29)
        h[i] = x


@njit(cache=True)
def _bags_equal(ids: np.ndarray, offsets: np.ndarray, first: np.ndarray,
                inverse: np.ndarray) -> bool:
    """Whether every example's bag equals the bag of its group's first example."""
    for i in range(inverse.shape[0]):
        r = first[inverse[i]]
        a, b = offsets[i], offsets[i + 1]
        ra = offsets[r]
        if offsets[r + 1] - ra != b - a:
            return False
        for j in range(b - a):
            if ids[a + j] != ids[ra + j]:
                return False
    return True


def distinct_examples(batch: SparseBatch) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: one example index per distinct example (its first occurrence, in
    order of first occurrence) and, per example, the position of its group in ``first``.

    Two examples are the same when every slot of ``batch`` holds the same IDs in the same order.
    """
    n = batch.size
    h = np.zeros(n, dtype=np.uint64)
    for slot in batch.slots.values():
        _hash_bags(h, slot.ids, slot.offsets)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # groups in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first, inverse = first[order], rank[inverse.ravel()]
    if not all(_bags_equal(s.ids, s.offsets, first, inverse) for s in batch.slots.values()):
        return np.arange(n), np.arange(n)
    return first, inverse


def take_examples(batch: SparseBatch, rows: np.ndarray) -> SparseBatch:
    """The examples ``rows`` of ``batch`` (in that order), every slot kept."""
    rows = np.asarray(rows, dtype=np.int64)
    slots = {}
    for name, slot in batch.slots.items():
        starts, ends = slot.offsets[rows], slot.offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Each taken ID's source position: its bag's start plus its place in the bag.
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        slots[name] = SlotIds(slot.ids[np.repeat(starts, lengths) + within], offsets)
    return SparseBatch(len(rows), slots)
