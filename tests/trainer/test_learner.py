"""OnlineLearner: learns a planted pattern, predicts before learning, round-trips its arrays."""

from __future__ import annotations

import copy

import numpy as np
import torch

from featurestore.schema import load_model_config
from freshrec.settings import default_model_config_path
from trainer.learner import OnlineLearner
from trainer.model import CTRModel, load_model_arrays, model_arrays
from trainer.progressive import auc

CONFIG = load_model_config(default_model_config_path())


def planted_stream(n: int, seed: int = 0) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Users 0-49 like even items, users 50-99 like odd ones (plus 10% label noise)."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 100, n), rng.integers(0, 40, n)
    likes = (users < 50) == (items % 2 == 0)
    labels = np.where(rng.random(n) < 0.9, likes, ~likes).astype(np.float64)
    records = [{"user_id": f"u{u}", "item_id": f"i{i}", "gender": "MF"[u % 2],
                "genres": ["even" if i % 2 == 0 else "odd"], "age": 30, "release_year": 1990}
               for u, i in zip(users, items, strict=True)]
    return records, labels, np.arange(n, dtype=np.float64)


def test_learns_a_planted_pattern() -> None:
    records, labels, ts = planted_stream(12_000)
    learner = OnlineLearner(CONFIG, threads=1)
    probs = np.concatenate([learner.step(records[i:i + 256], labels[i:i + 256],
                                         ts[i:i + 256]).probs
                            for i in range(0, len(labels), 256)])
    assert auc(labels[:512], probs[:512]) < 0.7  # nothing known yet
    assert auc(labels[-4000:], probs[-4000:]) > 0.8  # Bayes-optimal is 0.9


def test_a_prediction_never_sees_its_own_or_a_later_label() -> None:
    records, labels, ts = planted_stream(3000, seed=1)
    learner = OnlineLearner(CONFIG, threads=1, micro_batch=64)
    for i in range(0, 2000, 256):
        learner.step(records[i:i + 256], labels[i:i + 256], ts[i:i + 256])
    batch = slice(2000, 2300)
    j = 150  # flip this label and every later one in the batch
    flipped = labels[batch].copy()
    flipped[j:] = 1 - flipped[j:]
    a = copy.deepcopy(learner).step(records[batch], labels[batch], ts[batch]).probs
    b = copy.deepcopy(learner).step(records[batch], flipped, ts[batch]).probs
    np.testing.assert_array_equal(a[:j + 1], b[:j + 1])
    assert not np.array_equal(a[j + 1:], b[j + 1:])  # later slices did learn from them


def test_each_example_is_learned_before_the_next_is_predicted() -> None:
    records, labels, ts = planted_stream(600, seed=2)
    learner = OnlineLearner(CONFIG, threads=1, micro_batch=64)
    learner.step(records[:500], labels[:500], ts[:500])
    before = learner.predict(records[500:501])
    # The same example three times, labeled 1: each prediction comes from the model before it
    # (the first equals a read-only prediction) and the wide part learns between them.
    probs = learner.step([records[500]] * 3, np.ones(3), np.full(3, ts[500])).probs
    np.testing.assert_allclose(probs[0], before[0], rtol=1e-6)
    assert probs[0] < probs[1] < probs[2]
    frozen = learner.step(records[500:560], labels[500:560], ts[500:560], learn=False).probs
    np.testing.assert_allclose(frozen, learner.predict(records[500:560]), rtol=1e-6)


def test_model_arrays_round_trip_into_a_fresh_model() -> None:
    records, labels, ts = planted_stream(2000, seed=3)
    learner = OnlineLearner(CONFIG, threads=1)
    learner.step(records, labels, ts)
    fresh = CTRModel(CONFIG)
    load_model_arrays(fresh, model_arrays(learner.model))
    x = torch.randn(32, sum(s.dim for s in CONFIG.slots))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), learner.model(x))
