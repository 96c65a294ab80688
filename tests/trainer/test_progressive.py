"""Progressive metrics: AUC against a brute-force pairwise count, window eviction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.progressive import ProgressiveWindow, auc, logloss


def pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_count_including_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 7, 300) / 7.0  # few distinct values: many ties
    assert auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)


def test_auc_of_a_constant_predictor_is_one_half_and_nan_with_one_class() -> None:
    assert auc(np.array([0, 1, 1, 0]), np.full(4, 0.3)) == 0.5
    assert math.isnan(auc(np.ones(5), np.linspace(0, 1, 5)))


def test_logloss_is_clipped_and_matches_the_formula() -> None:
    y, p = np.array([1.0, 0.0]), np.array([0.8, 0.4])
    assert logloss(y, p) == pytest.approx(-(np.log(0.8) + np.log(0.6)) / 2)
    assert math.isfinite(logloss(np.array([1.0]), np.array([0.0])))


def test_window_keeps_only_the_most_recent_examples() -> None:
    window = ProgressiveWindow(4)
    window.add(np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0]))  # perfectly wrong
    window.add(np.array([0.0, 1.0, 0.0, 1.0]), np.array([0.1, 0.9, 0.2, 0.8]))  # evicts them
    s = window.scores()
    assert s.count == 4
    assert s.auc == 1.0
    assert s.calibration == pytest.approx(np.mean([0.1, 0.9, 0.2, 0.8]) / 0.5)


def test_window_eviction_wraps_around_the_ring() -> None:
    window = ProgressiveWindow(5)
    rng = np.random.default_rng(0)
    ys, ps = rng.integers(0, 2, 23).astype(float), rng.random(23)
    for i in range(0, 23, 3):
        window.add(ys[i:i + 3], ps[i:i + 3])
    s = window.scores()
    assert s.count == 5
    assert s.auc == pytest.approx(pairwise_auc(ys[-5:], ps[-5:]))
    assert s.logloss == pytest.approx(logloss(ys[-5:], ps[-5:]))


def test_an_empty_window_scores_nan() -> None:
    s = ProgressiveWindow(3).scores()
    assert s.count == 0 and math.isnan(s.auc) and math.isnan(s.logloss)
