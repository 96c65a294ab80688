"""The sparse Diag-LinUCB context of a user: its top-K nearest clusters and their weights.

Weighting: softmax of the negative squared distances to the K nearest centroids,
``w_i ∝ exp(-d2_i / T)``. With ``temperature=None`` T is per user the mean of its K squared
distances, which makes the weights scale-free: embeddings that grow during training (or live in a
high dimension where all distances are large) neither collapse to one-hot nor flatten to uniform.
Weights sum to 1, as the paper assumes, so a user's total "mass" in the statistics is the same
whatever K is.

The user vector is the *user tower*: the user-side slots of the model config (user ID, age,
gender, ...), each mean-pooled exactly as the CTR model's input, concatenated in config order
(:func:`user_tower`). A user without a user-ID row (a cold user) still has the rows of its
profile features, so it gets a real top-K context; a warm user's context moves as its rows learn.
The trainer (table rows) and the service (snapshot rows) both build it with this function.

Fallback for users with nothing at all (all-zero or non-finite vector: no admitted row in any
user-side slot): uniform weight ``1/K`` over the K most populous clusters (by ``counts``,
e.g. ``OnlineKMeans.counts``). We prefer this to a dedicated cold-start coordinate because it needs
no extra column, the serve-time context stays a plain BanditContext, and a cold user shares the
statistics of the bulk of the population — the best prior we have — while the bonus still reflects
how much that bulk has seen each item. Without ``counts`` the first K clusters are used.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from featurestore.featurize import SparseBatch
from featurestore.pooling import mean_pool
from featurestore.schema import ModelConfig, SlotSide


def user_slots(config: ModelConfig) -> list[tuple[str, int]]:
    """``(name, dim)`` of the user-side slots in config order: the user tower's layout."""
    return [(s.name, s.dim) for s in config.slots if s.side is SlotSide.USER]


def user_tower(config: ModelConfig, batch: SparseBatch,
               lookup: Callable[[str, np.ndarray], np.ndarray]) -> np.ndarray:
    """float32 ``(n, Σ user dims)``: each user-side slot mean-pooled, concatenated in order.

    ``batch`` holds (at least) the user-side slots of n records; ``lookup(slot, ids)`` returns
    float32 ``(len(ids), dim)`` vectors with zeros for IDs without a row (trainer table rows or
    the served snapshot's), so pooling follows :func:`featurestore.pooling.mean_pool`, the
    CTR model's rule.
    """
    parts = []
    for name, _dim in user_slots(config):
        s = batch.slots[name]
        parts.append(mean_pool(lookup(name, s.ids), s.offsets))
    return np.concatenate(parts, axis=1)


def context_for(
    user_vectors: np.ndarray,
    centroids: np.ndarray,
    k: int,
    *,
    temperature: float | None = None,
    counts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-K cluster contexts for a batch of users.

    Args:
        user_vectors: float32 ``(n, dim)`` user embeddings; all-zero rows mean "no embedding".
        centroids: float32 ``(C, dim)`` cluster centres (``OnlineKMeans.centroids``).
        k: clusters per user; clipped to ``C``.
        temperature: softmax temperature on squared distances; None = per-user mean of the K
            squared distances (scale-free).
        counts: points per cluster, used to pick the fallback clusters.

    Returns:
        ``(clusters int64[n, k], weights float64[n, k])``, nearest first; each weight row sums to 1.
    """
    U = np.asarray(user_vectors, dtype=np.float64)
    if U.ndim == 1:
        U = U[None, :]
    C = np.asarray(centroids, dtype=np.float64)
    if len(C) == 0:
        raise ValueError("need at least one centroid")
    k = max(1, min(int(k), len(C)))
    n = len(U)

    finite = np.isfinite(U).all(1)
    has_vec = finite & (np.abs(np.where(finite[:, None], U, 0.0)).sum(1) > 0)
    Uv = np.where(has_vec[:, None], U, 0.0)

    d2 = (Uv * Uv).sum(1)[:, None] - 2.0 * Uv @ C.T + (C * C).sum(1)[None, :]
    np.maximum(d2, 0.0, out=d2)
    if k < len(C):
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(len(C)), (n, len(C))).copy()
    dk = np.take_along_axis(d2, idx, axis=1)
    order = np.argsort(dk, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    dk = np.take_along_axis(dk, order, axis=1)

    T = np.full((n, 1), float(temperature)) if temperature else dk.mean(1, keepdims=True)
    T = np.maximum(T, 1e-12)
    logits = -(dk - dk[:, :1]) / T  # shift by the nearest for stability
    w = np.exp(logits)
    w /= w.sum(1, keepdims=True)

    if not has_vec.all():
        if counts is not None and len(counts) == len(C):
            fb = np.argsort(-np.asarray(counts), kind="stable")[:k]
        else:
            fb = np.arange(k)
        idx[~has_vec] = fb
        w[~has_vec] = 1.0 / k
    return idx.astype(np.int64), w
