"""Progressive validation: score each example before learning from it, over a sliding window.

This is River's ``progressive_val_score`` for a stream: every prediction is made by a model that
has not yet seen the example, so the numbers are honest out-of-sample estimates of what serving
would have scored at that moment. The window keeps the most recent ``window`` examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-7


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum formula, ties averaged; NaN if one class."""
    labels = np.asarray(labels)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = np.asarray(scores)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average ranks over ties so that a constant predictor scores exactly 0.5.
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy with probabilities clipped away from 0 and 1."""
    p = np.clip(probs, _EPS, 1 - _EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


@dataclass(frozen=True)
class WindowScores:
    """Metrics over the current window."""

    auc: float
    logloss: float
    calibration: float  # mean prediction / observed positive rate
    count: int


class ProgressiveWindow:
    """Ring buffer of the last ``window`` (label, prediction) pairs."""

    def __init__(self, window: int = 10_000) -> None:
        self._labels = np.zeros(window, dtype=np.float64)
        self._probs = np.zeros(window, dtype=np.float64)
        self._next = 0
        self._count = 0

    def add(self, labels: np.ndarray, probs: np.ndarray) -> None:
        """Record predictions made before learning from these labels."""
        n, size = len(labels), len(self._labels)
        if n >= size:
            labels, probs, n = labels[-size:], probs[-size:], size
        idx = (self._next + np.arange(n)) % size
        self._labels[idx] = labels
        self._probs[idx] = probs
        self._next = (self._next + n) % size
        self._count = min(self._count + n, size)

    def scores(self) -> WindowScores:
        """AUC, logloss and calibration of the window (NaN while it is empty)."""
        y, p = self._labels[: self._count], self._probs[: self._count]
        if self._count == 0:
            nan = float("nan")
            return WindowScores(nan, nan, nan, 0)
        rate = y.mean()
        calibration = float(p.mean() / rate) if rate > 0 else float("nan")
        return WindowScores(auc(y, p), logloss(y, p), calibration, self._count)
