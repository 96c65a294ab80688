"""Raw values become stable int64 IDs in one jagged batch."""

from __future__ import annotations

import numpy as np

from featurestore.featurize import Featurizer, encode_value, event_record
from featurestore.schema import SlotSide, load_model_config
from freshrec.settings import default_model_config_path

CONFIG = load_model_config(default_model_config_path())


def _featurizer() -> Featurizer:
    return Featurizer(load_model_config(default_model_config_path()))


def test_integers_are_their_own_id_and_strings_hash_stably() -> None:
    assert encode_value(42) == 42
    assert encode_value("42") == encode_value("42") != 42
    assert 0 <= encode_value("u42") < 2**63
    # Numbers beyond int64 (or the table's sentinel) are hashed, never overflow.
    for big in (2**70, -(2**63), 1.5e30):
        assert 0 <= encode_value(big) < 2**63


def test_jagged_batch_has_one_bag_per_record_and_empty_bags_for_missing_values() -> None:
    records = [
        event_record("u1", "m1", {"genres": ["Action", "Drama"], "age": "30"}),
        event_record("u2", "m2", {"genres": []}),
        event_record("u1", "m3", {"genres": ["Action"], "age": 70}),
    ]
    batch = _featurizer().featurize(records)
    assert batch.size == 3
    genres = batch.slots["genres"]
    assert genres.lengths.tolist() == [2, 0, 1]
    assert genres.ids[0] == genres.ids[2] == encode_value("Action")
    assert batch.slots["age"].lengths.tolist() == [1, 0, 1]
    assert batch.slots["age"].ids.tolist() == [2, 6]  # 25 <= 30 < 35; 70 beyond the last bound
    user = batch.slots["user"]
    assert user.ids[0] == user.ids[2] != user.ids[1]


def test_side_selects_only_that_sides_slots() -> None:
    f = _featurizer()
    batch = f.featurize([event_record("u1", "m1", {})], side=SlotSide.ITEM)
    assert set(batch.slots) == {s.name for s in f.config.slots if s.side is SlotSide.ITEM}
    assert batch.slots["item"].ids.dtype == np.int64


def test_memoized_encoding_and_the_event_path_match_the_plain_encoding() -> None:
    from types import SimpleNamespace

    records = [event_record(f"u{i % 7}", f"m{i % 5}", {"genres": ["a", "b"][: i % 3],
                                                       "age": 20 + i, "gender": "MF"[i % 2]})
               for i in range(50)]
    records += [{"user_id": 7, "item_id": 7.0, "genres": "a|b", "age": "x", "gender": True},
                {"user_id": "u1", "item_id": ["odd"], "age": None}]
    events = [SimpleNamespace(user_id=r["user_id"], item_id=r["item_id"],
                              features={k: v for k, v in r.items()
                                        if k not in ("user_id", "item_id")})
              for r in records]
    want = Featurizer(CONFIG, max_entries=1).featurize(records)
    small = Featurizer(CONFIG, max_entries=3)
    for got in (small.featurize(records), small.featurize(records),
                small.featurize_events(events), Featurizer(CONFIG).featurize_events(events)):
        for name, slot in want.slots.items():
            np.testing.assert_array_equal(got.slots[name].ids, slot.ids)
            np.testing.assert_array_equal(got.slots[name].offsets, slot.offsets)
    direct = [encode_value(r["user_id"]) for r in records]
    np.testing.assert_array_equal(want.slots["user"].ids, direct)


def test_event_path_with_every_feature_present_matches_the_plain_encoding() -> None:
    """Batches where every event has every feature: cold (columns) and warm (every value
    memoized: one chained pass per slot) give the plain encoding, and so does a warm batch
    where one event lacks a feature."""
    from types import SimpleNamespace

    names = [s.source for s in CONFIG.slots if s.source not in ("user_id", "item_id")]
    values = {"age": "31", "gender": "F", "occupation": "writer", "zip_prefix": "94",
              "genres": ["Drama", "War"], "release_year": 1994}
    assert set(values) == set(names)
    events = [SimpleNamespace(user_id=f"u{i}", item_id=i % 3,
                              features=values | {"age": 18 + i, "genres": ["x"] * (i % 3)})
              for i in range(20)]
    want = Featurizer(CONFIG, max_entries=1).featurize(
        [event_record(e.user_id, e.item_id, e.features) for e in events])
    featurizer = Featurizer(CONFIG)
    for got in (featurizer.featurize_events(events), featurizer.featurize_events(events)):
        for name, slot in want.slots.items():
            np.testing.assert_array_equal(got.slots[name].ids, slot.ids)
            np.testing.assert_array_equal(got.slots[name].offsets, slot.offsets)
    lacking = [*events[:5], SimpleNamespace(user_id="u1", item_id=1,
                                            features={"gender": "F"}), *events[5:]]
    want = Featurizer(CONFIG, max_entries=1).featurize(
        [event_record(e.user_id, e.item_id, e.features) for e in lacking])
    got = featurizer.featurize_events(lacking)
    for name, slot in want.slots.items():
        np.testing.assert_array_equal(got.slots[name].ids, slot.ids)
        np.testing.assert_array_equal(got.slots[name].offsets, slot.offsets)
    assert len(got.slots["age"].ids) == len(lacking) - 1  # the absent age: an empty bag
    empty = Featurizer(CONFIG).featurize_events([])
    assert empty.size == 0 and all(len(s.offsets) == 1 for s in empty.slots.values())
