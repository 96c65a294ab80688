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

from featurestore.hashmap import unique_rows

ADAGRAD_EPS = 1e-10


@njit(cache=True)
def sum_by_row(rows: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique valid rows (first-occurrence order) and the sum of their gradients."""
    uniq, local = unique_rows(rows)
    summed = np.zeros((uniq.shape[0], grads.shape[1]), dtype=np.float32)
    for i in range(rows.shape[0]):
        p = local[i]
        if p >= 0:
            for j in range(grads.shape[1]):
                summed[p, j] += grads[i, j]
    return uniq, summed


# --- one coordinate of each optimizer: the only place its update rule is written --------------
# The batch kernels below (one step per unique row) and the trainer's per-example kernels
# (trainer/wide.py) both call these, so a rule cannot drift between the two paths.

SGD, ADAGRAD, FTRL = 0, 1, 2  # optimizer codes for kernels that serve every slot


@njit(cache=True, inline="always")
def adagrad_coord(emb: np.ndarray, acc: np.ndarray, r: int, j: int, g: float, lr: float) -> None:
    """``a += g^2; w -= lr * g / (sqrt(a) + eps)`` on ``emb[r, j]``."""
    a = np.float32(np.float64(acc[r, j]) + g * g)
    acc[r, j] = a
    step = lr * g / (math.sqrt(np.float64(a)) + ADAGRAD_EPS)
    emb[r, j] = np.float32(np.float64(emb[r, j]) - step)


@njit(cache=True, inline="always")
def ftrl_coord(emb: np.ndarray, z: np.ndarray, n: np.ndarray, r: int, j: int, g: float,
               alpha: float, beta: float, l1: float, l2: float) -> None:
    """FTRL-proximal on ``emb[r, j]`` (``emb`` holds the closed-form weight)."""
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


@njit(cache=True, inline="always")
def update_coord(kind: int, emb: np.ndarray, s1: np.ndarray, s2: np.ndarray, r: int, j: int,
                 g: float, lr: float, beta: float, l1: float, l2: float) -> None:
    """One step of optimizer ``kind`` on ``emb[r, j]``; ``s1``/``s2``: its state arrays
    (Adagrad: ``acc``, unused; FTRL: ``z``, ``n``; SGD: unused)."""
    if kind == ADAGRAD:
        adagrad_coord(emb, s1, r, j, g, lr)
    elif kind == FTRL:
        ftrl_coord(emb, s1, s2, r, j, g, lr, beta, l1, l2)
    else:
        emb[r, j] = np.float32(np.float64(emb[r, j]) - lr * g)


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
            adagrad_coord(emb, acc, r, j, np.float64(grads[i, j]), lr)


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
            ftrl_coord(emb, z, n, r, j, np.float64(grads[i, j]), alpha, beta, l1, l2)


def ftrl_z_for_weights(
    w: np.ndarray, n0: float, alpha: float, beta: float, l1: float, l2: float
) -> np.ndarray:
    """The ``z`` whose FTRL closed form gives weights ``w`` at accumulator ``n0``."""
    d = (beta + math.sqrt(n0)) / alpha + l2
    w64 = w.astype(np.float64)
    return (-w64 * d - np.sign(w64) * l1).astype(np.float32)
