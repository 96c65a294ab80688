"""The per-candidate ID table equals featurizing the candidates, whatever it has seen before."""

from __future__ import annotations

import numpy as np

from featurestore.featurize import Featurizer
from featurestore.schema import SlotSide, load_model_config
from freshrec.settings import default_model_config_path
from service.candidates import CandidateIds, UserIds, candidate_key

GENRES = ["Drama", "Comedy", "Action", "War"]


def _items(rng: np.random.Generator, n: int) -> list[tuple[str, dict]]:
    out = []
    for _ in range(n):
        j = int(rng.integers(50))
        genres = [GENRES[g] for g in rng.choice(4, size=int(rng.integers(0, 4)), replace=False)]
        feats: dict = {"genres": genres, "release_year": 1950 + j % 40}
        if j % 7 == 0:
            feats = {}  # no features at all: empty bags
        out.append((f"m{j}", feats))
    return out


def _reference(featurizer: Featurizer, items: list[tuple[str, dict]]) -> dict:
    batch = featurizer.featurize([{**f, "item_id": i} for i, f in items], SlotSide.ITEM)
    return batch.slots


def test_gathered_ids_equal_featurizing_every_request() -> None:
    config = load_model_config(default_model_config_path())
    featurizer = Featurizer(config)
    slots = [s.name for s in config.slots if s.side is SlotSide.ITEM]
    table = CandidateIds(Featurizer(config), slots, capacity=60)  # small: resets happen
    rng = np.random.default_rng(3)
    for _ in range(40):
        items = _items(rng, int(rng.integers(1, 30)))
        got = table.slot_ids([candidate_key(i, f) for i, f in items], items)
        want = _reference(featurizer, items)
        assert set(got) == set(slots)
        for s in slots:
            np.testing.assert_array_equal(got[s].offsets, want[s].offsets)
            np.testing.assert_array_equal(got[s].ids, want[s].ids)
        assert len(table) <= 60


def test_json_values_that_compare_equal_in_python_do_not_share_ids() -> None:
    config = load_model_config(default_model_config_path())
    slots = [s.name for s in config.slots if s.side is SlotSide.ITEM]
    table = CandidateIds(Featurizer(config), slots)
    items = [("m1", {"release_year": 1990}), ("m1", {"release_year": 1990.0}),
             ("m1", {"release_year": True})]
    keys = [candidate_key(i, f) for i, f in items]
    assert len(set(keys)) == 3  # 1990 == 1990.0 and True == 1 in Python, not in JSON
    table.slot_ids(keys, items)
    assert len(table) == 3


def test_the_table_bounds_the_bytes_of_its_keys_too() -> None:
    config = load_model_config(default_model_config_path())
    slots = [s.name for s in config.slots if s.side is SlotSide.ITEM]
    table = CandidateIds(Featurizer(config), slots, max_key_bytes=2_000)
    for j in range(100):
        items = [(f"m{j}", {"genres": ["x" * 200]})]
        got = table.slot_ids([candidate_key(i, f) for i, f in items], items)
        assert len(got[slots[0]].offsets) == 2
        assert table._key_bytes <= 2_000


def test_memoized_user_ids_equal_featurizing_and_stay_bounded() -> None:
    config = load_model_config(default_model_config_path())
    featurizer = Featurizer(config)
    users = UserIds(Featurizer(config), capacity=5, max_key_bytes=400)
    rng = np.random.default_rng(4)
    for _ in range(60):
        u = int(rng.integers(12))
        feats: dict = {"age": 20 + u, "gender": "MF"[u % 2], "occupation": f"o{u % 3}"}
        if u % 5 == 0:
            feats["age"] = float(feats["age"]) + 0.5  # another JSON value: its own entry
        got = users.slot_ids(f"u{u}", feats)
        want = featurizer.featurize([{**feats, "user_id": f"u{u}"}], SlotSide.USER).slots
        assert set(got) == set(want)
        for s in want:
            np.testing.assert_array_equal(got[s].ids, want[s].ids)
            np.testing.assert_array_equal(got[s].offsets, want[s].offsets)
        assert len(users) <= 5 and users._key_bytes <= 400
