"""Merging consecutive deltas equals applying them one after the other."""

from __future__ import annotations

import numpy as np

from featurestore.snapshot_merge import merge_deltas, pending_rows
from featurestore.snapshot_types import BanditRows, SnapshotData


def random_delta(rng: np.random.Generator, universe: np.ndarray) -> SnapshotData:
    ids = np.unique(rng.choice(universe, size=rng.integers(0, 30)))
    rng.shuffle(ids)
    dels = np.setdiff1d(rng.choice(universe, size=rng.integers(0, 30)), ids)
    items = np.unique(rng.choice(universe, size=rng.integers(0, 5)))
    return SnapshotData(
        emb={"s": (ids, rng.normal(size=(len(ids), 2)).astype(np.float32))} if len(ids) else {},
        deleted={"s": dels} if len(dels) else {},
        bandit=BanditRows(items, rng.random(len(items)), rng.random((len(items), 1)),
                          rng.random((len(items), 1))) if len(items) else None,
        dense={"w": rng.normal(size=3)} if rng.random() < 0.3 else None,
    )  # fmt: skip


def apply(state: dict, data: SnapshotData) -> None:
    rows, bandit = state.setdefault("rows", {}), state.setdefault("bandit", {})
    for ids, vecs in data.emb.values():
        rows.update(zip(ids.tolist(), map(tuple, vecs.tolist()), strict=True))
    for ids in data.deleted.values():
        for i in ids.tolist():
            rows.pop(i, None)
    if data.bandit is not None:
        bandit.update(zip(data.bandit.item_ids.tolist(), data.bandit.d[:, 0].tolist(),
                          strict=True))
    if data.dense is not None:
        state["dense"] = data.dense["w"].tolist()


def test_merged_deltas_have_the_effect_of_the_sequence() -> None:
    rng = np.random.default_rng(0)
    universe = rng.integers(-(2**62), 2**62, size=60)
    for _ in range(30):
        deltas = [random_delta(rng, universe) for _ in range(int(rng.integers(2, 8)))]
        start = {"rows": {int(i): (1.0, 1.0) for i in universe[:20]}, "bandit": {}}
        one_by_one = {k: dict(v) for k, v in start.items()}
        for d in deltas:
            apply(one_by_one, d)
        merged = deltas[0]
        for d in deltas[1:]:
            merged = merge_deltas(merged, d)
        at_once = {k: dict(v) for k, v in start.items()}
        apply(at_once, merged)
        assert at_once == one_by_one
        # Each ID appears once: upserts and deletions are disjoint, and nothing repeats.
        ids = merged.emb["s"][0] if "s" in merged.emb else np.empty(0)
        dels = merged.deleted.get("s", np.empty(0))
        assert len(np.unique(ids)) == len(ids) and not np.isin(dels, ids).any()
        assert pending_rows(merged) == len(ids) + len(dels) + (
            len(merged.bandit.item_ids) if merged.bandit is not None else 0)
