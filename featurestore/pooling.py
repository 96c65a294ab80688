"""Mean-pooling of jagged per-slot embeddings into one vector per example: the one implementation.

The rule: the mean of the bag's vectors, zeros for an empty bag; an unadmitted or unknown ID
(row ``-1``) contributes a zero vector but still counts in the mean, exactly as in training.
The trainer pools its working set with :func:`pool_rows` (and :func:`pool_bag` inside its
per-example kernel); the service pools its snapshot vectors with the same :func:`pool_rows`.
Same code, same float32 inputs, so a served score equals the trainer's prediction bit for bit.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def pool_bag(emb: np.ndarray, rows: np.ndarray, a: int, b: int, dim: int, out: np.ndarray,
             col: int) -> None:
    """``out[col:col + dim]`` = the mean of ``emb[rows[a:b], :dim]`` (``rows < 0``: zeros)."""
    for k in range(dim):
        out[col + k] = 0.0
    if b <= a:
        return
    for j in range(a, b):
        r = rows[j]
        if r >= 0:
            for k in range(dim):
                out[col + k] += emb[r, k]
    if b - a > 1:
        inv = np.float32(1.0 / (b - a))
        for k in range(dim):
            out[col + k] *= inv


@njit(cache=True)
def pool_rows(emb: np.ndarray, rows: np.ndarray, offsets: np.ndarray, out: np.ndarray,
              col: int) -> None:
    """For every example i: ``out[i, col:col + dim]`` = the mean of its bag's rows of ``emb``."""
    for i in range(offsets.shape[0] - 1):
        pool_bag(emb, rows, offsets[i], offsets[i + 1], emb.shape[1], out[i], col)


def mean_pool(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``(batch, dim)`` means of ``vectors[offsets[i]:offsets[i+1]]``; zeros for empty bags."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    out = np.zeros((len(offsets) - 1, vectors.shape[1]), dtype=np.float32)
    pool_rows(vectors, np.arange(len(vectors), dtype=np.int64),
              np.ascontiguousarray(offsets, dtype=np.int64), out, 0)
    return out
