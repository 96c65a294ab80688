"""Sparse optimizer steps for embedding rows: one step per unique row, on pre-summed gradients.

All kernels take ``rows`` (unique, valid) and ``grads`` (float32, one row per entry of ``rows``)
and update the row arrays in place. Arithmetic is done in float64 and stored as float32 so the
result does not depend on how numba vectorizes the inner loop.

- SGD: ``w -= lr * g``.
- Adagrad (per coordinate): ``a += g^2; w -= lr * g / (sqrt(a) + eps)``.
- Row-wise Adagrad (TorchRec/FBGEMM ``EXACT_ROWWISE_ADAGRAD``): one accumulator per row,
  ``a += mean(g^2)``; a dim-16 row then carries 4 bytes of optimizer state instead of 64.
- FTRL-proximal (McMahan et al. 2013) per coordinate with ``alpha = lr``; ``z`` and ``n`` are
  the state. A fresh row's ``z`` is set so that the closed-form weight equals its random
  initial value (see :func:`ftrl_z_for_weights`), so FTRL rows start from the same init as
  the other optimizers instead of from zero.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

ADAGRAD_EPS = 1e-10


@njit(cache=True)
def sum_by_row(rows: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique valid rows (first-occurrence order) and the sum of their gradients.

    A scratch open-addressing map sized for this batch does the grouping, so the cost is
    O(batch) and no per-table scratch memory is kept between calls.
    """
    n, dim = grads.shape
    cap = 16
    while cap < 2 * n:
        cap *= 2
    slot_rows = np.full(cap, -1, dtype=np.int64)
    slot_pos = np.empty(cap, dtype=np.int64)
    uniq = np.empty(n, dtype=np.int64)
    summed = np.zeros((n, dim), dtype=np.float32)
    k = 0
    mask = cap - 1
    for i in range(n):
        r = rows[i]
        if r < 0:
            continue
        s = (r * 0x9E3779B1) & mask
        while slot_rows[s] != -1 and slot_rows[s] != r:
            s = (s + 1) & mask
        if slot_rows[s] == -1:
            slot_rows[s] = r
            slot_pos[s] = k
            uniq[k] = r
            k += 1
        p = slot_pos[s]
        for j in range(dim):
            summed[p, j] += grads[i, j]
    return uniq[:k], summed[:k]


@njit(cache=True)
def sgd_step(emb: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float) -> None:
    """Plain SGD."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(emb.shape[1]):
            emb[r, j] = np.float32(np.float64(emb[r, j]) - lr * np.float64(grads[i, j]))


@njit(cache=True)
def adagrad_step(
    emb: np.ndarray, acc: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float
) -> None:
    """Per-coordinate Adagrad."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(emb.shape[1]):
            g = np.float64(grads[i, j])
            a = np.float64(acc[r, j]) + g * g
            acc[r, j] = np.float32(a)
            emb[r, j] = np.float32(
                np.float64(emb[r, j])
                - lr * g / (math.sqrt(np.float64(np.float32(a))) + ADAGRAD_EPS)
            )


@njit(cache=True)
def rowwise_adagrad_step(
    emb: np.ndarray, acc: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float
) -> None:
    """Row-wise Adagrad: one accumulator per row, incremented by the mean squared gradient."""
    dim = emb.shape[1]
    for i in range(rows.shape[0]):
        r = rows[i]
        sq = 0.0
        for j in range(dim):
            g = np.float64(grads[i, j])
            sq += g * g
        a = np.float32(np.float64(acc[r]) + sq / dim)
        acc[r] = a
        denom = math.sqrt(np.float64(a)) + ADAGRAD_EPS
        for j in range(dim):
            emb[r, j] = np.float32(np.float64(emb[r, j]) - lr * np.float64(grads[i, j]) / denom)


@njit(cache=True)
def ftrl_step(
    emb: np.ndarray,
    z: np.ndarray,
    n: np.ndarray,
    rows: np.ndarray,
    grads: np.ndarray,
    alpha: float,
    beta: float,
    l1: float,
    l2: float,
) -> None:
    """FTRL-proximal per coordinate; ``emb`` holds the closed-form weights."""
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(emb.shape[1]):
            g = np.float64(grads[i, j])
            n_old = np.float64(n[r, j])
            n_new = n_old + g * g
            sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / alpha
            zz = np.float64(z[r, j]) + g - sigma * np.float64(emb[r, j])
            z[r, j] = np.float32(zz)
            n[r, j] = np.float32(n_new)
            if abs(zz) <= l1:
                emb[r, j] = np.float32(0.0)
            else:
                sign = 1.0 if zz > 0 else -1.0
                emb[r, j] = np.float32(-(zz - sign * l1) / ((beta + math.sqrt(n_new)) / alpha + l2))


def ftrl_z_for_weights(
    w: np.ndarray, n0: float, alpha: float, beta: float, l1: float, l2: float
) -> np.ndarray:
    """The ``z`` whose FTRL closed form gives weights ``w`` at accumulator ``n0``."""
    d = (beta + math.sqrt(n0)) / alpha + l2
    w64 = w.astype(np.float64)
    return (-w64 * d - np.sign(w64) * l1).astype(np.float32)
