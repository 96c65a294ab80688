"""The rank learner's exchange, in one process (a gloo group of one rank)."""

from __future__ import annotations

import socket

import numpy as np
import orjson
import pytest
import torch.distributed as dist

from featurestore.events import parse_labeled_event
from featurestore.schema import load_model_config
from featurestore.snapshot_keys import bucket_of
from freshrec.settings import default_model_config_path
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from trainer.learner import OnlineLearner
from trainer.ranks import global_round
from trainer.sharded import Ranks, ShardedLearner, _admitted_positions


@pytest.fixture(scope="module")
def group_of_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_through_the_exchange_learns_what_one_process_learns(group_of_one) -> None:
    """Fetch, learn on fetched rows, push changes back: with one rank the only difference
    from the single process is float rounding of ``old + (new - old)``."""
    config = load_model_config(default_model_config_path())
    events = [parse_labeled_event(orjson.dumps(e)) for e in
              SyntheticStream(SyntheticConfig(seed=21, n_users=500, n_items=300)).events(1500)]
    single, ranked = OnlineLearner(config), ShardedLearner(config, Ranks(0, 1, 64))
    for lo in range(0, len(events), 500):
        part = events[lo:lo + 500]
        batch = single.featurizer.featurize_events(part)
        y = np.array([e.label for e in part], dtype=np.float64)
        ts = np.array([e.ts for e in part], dtype=np.float64)
        expected = single.step_batch(batch, y, ts).probs
        ranked.step_counts = np.array([len(part)])
        assert np.abs(ranked.step_batch(batch, y, ts).probs - expected).max() < 1e-6
    for slot in single.tables:
        ids_a, emb_a = single.tables[slot].all_rows()
        ids_b, emb_b = ranked.tables[slot].all_rows()
        a, b = np.argsort(ids_a), np.argsort(ids_b)
        assert np.array_equal(ids_a[a], ids_b[b]), slot
        assert np.abs(emb_a[a] - emb_b[b]).max() < 1e-6, slot
    params = dict(ranked.model.named_parameters())
    for name, value in single.model.named_parameters():
        assert (value - params[name]).abs().max().item() < 1e-6, name


def test_ownership_and_partitions() -> None:
    ranks = [Ranks(r, 2, 64) for r in range(2)]
    ids = np.arange(10_000, dtype=np.int64)
    owners = ranks[0].owner_of(ids)
    assert np.array_equal(owners, bucket_of(ids, 64) % 2)  # the snapshot layout's buckets
    assert set(ranks[1].owned_buckets()) == set(range(1, 64, 2))
    assert [r.partitions(5) for r in ranks] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="buckets"):
        Ranks(0, 4, 2)


def test_leading_not_admitted_occurrences_read_no_row() -> None:
    # ID 0 occurs at positions 0, 2, 3 and its first two occurrences were not admitted yet.
    inverse = np.array([0, 1, 0, 0])
    rows = _admitted_positions(inverse, np.array([3, 1]), np.array([2, 0]))
    assert rows.tolist() == [-1, 1, -1, 0]


def test_ranks_restore_the_newest_round_every_rank_holds() -> None:
    # rank 0 saved round 3 before rank 1 died: both restore round 2
    assert global_round([{2, 3}, {1, 2}], [3, 2]) == 2
    assert global_round([{0}, set()], [0, -1]) is None  # died during the first round: fresh
    with pytest.raises(RuntimeError, match="lost its volume"):
        global_round([{4, 5}, set()], [5, -1])
    with pytest.raises(RuntimeError, match="world size"):  # rounds of another world size
        global_round([set(), set()], [7, 7])


def test_one_rank_explores_as_one_process(group_of_one) -> None:
    """The rank's exploration hook (towers from the rows the rank learned, the exchange of
    shares, statistics kept by the item's owner) with one rank: the clusters and statistics of
    the single process's hook on the same steps, up to the float rounding of the exchange."""
    from featurestore.labeled_batch import LabeledBatch
    from freshrec.settings import Settings
    from trainer.exploration import ExplorationHook
    from trainer.ranks import rank_hooks

    config = load_model_config(default_model_config_path())
    settings = Settings(bandit_clusters=6)
    events = [parse_labeled_event(orjson.dumps(e)) for e in
              SyntheticStream(SyntheticConfig(seed=23, n_users=300, n_items=200)).events(1500)]
    single, ranked = OnlineLearner(config), ShardedLearner(config, Ranks(0, 1, 64))
    one = ExplorationHook.from_settings(settings, config)
    (rank,) = rank_hooks(settings, config, Ranks(0, 1, 64))
    for lo in range(0, len(events), 300):
        batch = LabeledBatch.of_events(events[lo:lo + 300], single.featurizer)
        single.step_batch(batch.sparse, batch.labels, batch.ts)
        one.on_batch(batch, single)
        ranked.step_counts = np.array([len(batch)])
        ranked.step_batch(batch.sparse, batch.labels, batch.ts)
        rank.on_batch(batch, ranked)
    assert rank.clusters.n_initialized == one.clusters.n_initialized == 6
    np.testing.assert_allclose(rank.clusters.centroids, one.clusters.centroids, atol=1e-5)
    np.testing.assert_allclose(rank.clusters.counts, one.clusters.counts)
    ours, theirs = rank.bandit.to_arrays(), one.bandit.to_arrays()
    assert np.array_equal(ours["item_ids"], theirs["item_ids"])
    np.testing.assert_allclose(ours["d"], theirs["d"], atol=1e-5)
    np.testing.assert_allclose(ours["b"], theirs["b"], atol=1e-5)
    assert len(rank.bandit) > 100 and rank.assigned == one.assigned > 0
