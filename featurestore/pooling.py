"""Mean-pooling of jagged per-slot embeddings into one vector per example.

The trainer pools in torch (it needs gradients); the service pools in numpy with this function.
Both use the same rule, so a served score equals the trainer's prediction for the same rows:
the mean of the bag's vectors, zeros for an empty bag (unadmitted IDs contribute zero vectors
but still count in the mean, exactly as in training).
"""

from __future__ import annotations

import numpy as np


def segment_ids(offsets: np.ndarray) -> np.ndarray:
    """Example index of every ID in a jagged batch."""
    lengths = np.diff(offsets)
    return np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)


def mean_pool(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(batch, dim)`` means of ``vectors[offsets[i]:offsets[i+1]]``; zeros for empty bags."""
    batch = len(offsets) - 1
    out = np.zeros((batch, vectors.shape[1]), dtype=np.float32)
    if vectors.shape[0]:
        np.add.at(out, segment_ids(offsets), vectors)
        lengths = np.diff(offsets)
        out /= np.maximum(lengths, 1)[:, None]
    return out
