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
from numba import njit

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


@njit(cache=True)
def _top_k_contexts(U: np.ndarray, C: np.ndarray, dots: np.ndarray, k: int,
                    temperature: float, fallback: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The kernel of :func:`context_for` (float64 inputs, ``dots = U @ C.T`` from BLAS,
    ``temperature <= 0`` = per user)."""
    n, dim = U.shape
    m = C.shape[0]
    cc = np.empty(m)
    for j in range(m):
        acc = 0.0
        for t in range(dim):
            acc += C[j, t] * C[j, t]
        cc[j] = acc
    idx = np.empty((n, k), dtype=np.int64)
    w = np.empty((n, k))
    dk = np.empty(k)
    for i in range(n):
        finite, mass, uu = True, 0.0, 0.0
        for t in range(dim):
            v = U[i, t]
            if not np.isfinite(v):
                finite = False
                break
            mass += abs(v)
            uu += v * v
        if not finite or mass == 0.0:
            for q in range(k):
                idx[i, q] = fallback[q]
                w[i, q] = 1.0 / k
            continue
        # The k nearest, nearest first (ties: lower cluster index first), by insertion.
        filled = 0
        for j in range(m):
            d2 = max(uu - 2.0 * dots[i, j] + cc[j], 0.0)
            if filled == k and d2 >= dk[k - 1]:
                continue
            q = filled if filled < k else k - 1
            while q > 0 and dk[q - 1] > d2:
                dk[q] = dk[q - 1]
                idx[i, q] = idx[i, q - 1]
                q -= 1
            dk[q] = d2
            idx[i, q] = j
            if filled < k:
                filled += 1
        if temperature > 0.0:
            T = temperature
        else:
            T = 0.0
            for q in range(k):
                T += dk[q]
            T /= k
        T = max(T, 1e-12)
        total = 0.0
        for q in range(k):
            e = np.exp(-(dk[q] - dk[0]) / T)  # shifted by the nearest for stability
            w[i, q] = e
            total += e
        for q in range(k):
            w[i, q] /= total
    return idx, w


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
    U = np.ascontiguousarray(user_vectors, dtype=np.float64)
    if U.ndim == 1:
        U = U[None, :]
    C = np.ascontiguousarray(centroids, dtype=np.float64)
    if len(C) == 0:
        raise ValueError("need at least one centroid")
    if U.shape[1] != C.shape[1]:
        raise ValueError(f"user vectors of width {U.shape[1]}, centroids of {C.shape[1]}")
    k = max(1, min(int(k), len(C)))
    if counts is not None and len(counts) == len(C):
        fallback = np.argsort(-np.asarray(counts), kind="stable")[:k].astype(np.int64)
    else:
        fallback = np.arange(k, dtype=np.int64)
    # The user-centroid dot products are one matrix product (BLAS), the rest one pass per user.
    dots = np.nan_to_num(U) @ C.T
    return _top_k_contexts(U, C, dots, k, float(temperature) if temperature else 0.0,
                           fallback)
