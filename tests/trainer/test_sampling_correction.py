"""Training on down-sampled negatives with the log-odds offset keeps pCTR calibrated."""

from __future__ import annotations

import math

import numpy as np

from featurestore.featurize import event_record
from featurestore.schema import load_model_config
from freshrec.settings import default_model_config_path
from trainer.learner import OnlineLearner


def _train(rate: float, correct: bool, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    true_p = {"cheap": 0.05, "popular": 0.3}
    learner = OnlineLearner(load_model_config(default_model_config_path()), seed=seed)
    items = rng.choice(list(true_p), size=60_000)
    labels = (rng.random(len(items)) < np.array([true_p[i] for i in items])).astype(float)
    kept = (labels == 1) | (rng.random(len(items)) < rate)
    items, labels = items[kept], labels[kept]
    offset = np.full(len(items), -math.log(rate)) if correct else None
    records = [event_record(f"u{k % 50}", item, {}) for k, item in enumerate(items)]
    for i in range(0, len(records), 256):
        sl = slice(i, i + 256)
        learner.step(records[sl], labels[sl], np.zeros(len(labels[sl])),
                     logit_offset=None if offset is None else offset[sl])
    probe = [event_record(f"u{k}", item, {}) for item in true_p for k in range(50)]
    p = learner.predict(probe)
    return {"cheap": float(p[:50].mean()), "popular": float(p[50:].mean())}


def test_log_odds_offset_restores_calibration_under_negative_sampling() -> None:
    corrected = _train(rate=0.2, correct=True)
    naive = _train(rate=0.2, correct=False)
    assert abs(corrected["cheap"] - 0.05) < 0.03
    assert abs(corrected["popular"] - 0.3) < 0.08
    assert naive["cheap"] > 0.12  # uncorrected: odds inflated ~5x
