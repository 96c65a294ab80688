"""The wide part of the CTR model: a bias per ID plus a factorization machine between the user
side and the item side, learned one example at a time in compiled code.

The logit of an example is ``deep(x) + wide(x)`` where ``x`` is the concatenation of the
slots' pooled vectors (``featurestore.pooling``) and

    wide(x) = sum_s x_s[0] + sum_{s in U, t in I} <x_s[1:1+K], x_t[1:1+K]>     (K = fm_dim)

i.e. coordinate 0 of every row is the ID's bias (a linear model over the IDs) and the next K
its factor in a field-level FM (Rendle 2010, over pooled slot vectors) whose pairs join a
user-side slot ``U`` (user ID, demographics, context) with an item-side slot ``I`` (item ID,
its attributes). Pairs within one side are left out: a pair of user-side slots is the same
for every candidate of a request (and a pair of item-side slots the same for every request
of an item), so it ranks nothing a bias does not, while its gradient pulls both factors
toward explaining that constant instead of the user-item match. Measured (docs/trainer.md):
cross-side pairs only beat all pairs on MovieLens, the synthetic stream and the held-out one.
Both live in the slots' embedding rows, so admission, expiry, snapshots and serving need
nothing new. The service computes :func:`wide_logits` on its pooled vectors; the trainer's
kernel calls the same :func:`wide_logit_row` per example.

Why per example: on a time-ordered stream the next events of a user or an item follow within
the same consumed batch. A learner that updates only between slices predicts them without
their predecessors (micro-batch 64 cost 0.03 AUC on MovieLens against VW, which learns each
example before the next); this kernel learns the wide part the way VW and Fwumious Wabbit do —
predict, then one Adagrad/FTRL/SGD step on each coordinate the example touched — at ~1 us per
example. The deep part (``trainer.model.CTRModel``) is learned in micro-batches on top.

The working set: a consumed batch's rows are copied out of their tables into one float32
matrix (``W``, one row per distinct admitted ID, ``dim_max`` columns) with their optimizer
state (``S1``, ``S2``), learned there, and written back once per batch. That keeps the kernel
to flat arrays (no per-slot dispatch inside the example loop).

``sides[s]``: 0 for a user-side slot, 1 for an item-side one (``ModelConfig.slot_sides``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from featurestore.optimizers import update_coord
from featurestore.pooling import pool_bag


@njit(cache=True, inline="always")
def wide_logit_row(x: np.ndarray, starts: np.ndarray, fm_dim: int, sides: np.ndarray) -> float:
    """``wide(x)`` for one pooled input row (float64 arithmetic): per factor coordinate, the
    product of the user side's sum and the item side's sum is the sum over cross-side pairs."""
    z = 0.0
    for s in range(starts.shape[0]):
        z += np.float64(x[starts[s]])
    for k in range(1, fm_dim + 1):
        user = 0.0
        item = 0.0
        for s in range(starts.shape[0]):
            if sides[s] == 0:
                user += np.float64(x[starts[s] + k])
            else:
                item += np.float64(x[starts[s] + k])
        z += user * item
    return z


@njit(cache=True, nogil=True)
def wide_logits(x: np.ndarray, starts: np.ndarray, fm_dim: int, sides: np.ndarray) -> np.ndarray:
    """``wide(x)`` for every row of a ``(batch, width)`` float32 input; float64 ``(batch,)``."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for i in range(x.shape[0]):
        out[i] = wide_logit_row(x[i], starts, fm_dim, sides)
    return out


@njit(cache=True, nogil=True)
def pool_examples(W: np.ndarray, loc: np.ndarray, offs: np.ndarray, lo: int, hi: int,
                  starts: np.ndarray, dims: np.ndarray, out: np.ndarray) -> None:
    """``out[i - lo]`` = the pooled input of example i in ``lo:hi``, from the working set."""
    for i in range(lo, hi):
        for s in range(starts.shape[0]):
            pool_bag(W, loc, offs[s, i], offs[s, i + 1], dims[s], out[i - lo], starts[s])


@njit(cache=True, nogil=True)
def learn_wide(W: np.ndarray, S1: np.ndarray, S2: np.ndarray, loc: np.ndarray,
               offs: np.ndarray, lo: int, hi: int, starts: np.ndarray, dims: np.ndarray,
               kinds: np.ndarray, lrs: np.ndarray, bias_lrs: np.ndarray, betas: np.ndarray,
               l1s: np.ndarray, l2s: np.ndarray, fm_dim: int, sides: np.ndarray,
               deep: np.ndarray, offset: np.ndarray,
               labels: np.ndarray, probs: np.ndarray, wide: np.ndarray, x: np.ndarray) -> None:
    """Predict-then-learn examples ``lo:hi`` one at a time on the working set.

    ``deep[i - lo]``: the deep logit of example i (from the model before this slice);
    ``offset[i]``: added inside the loss only (log-odds correction of sampled negatives).
    Writes ``probs[i]`` (the prediction before learning example i, by a wide part that has
    learned every earlier example) and ``wide[i]`` (its wide logit). ``x``: scratch row.
    """
    n_slots = starts.shape[0]
    side_sum = np.zeros((2, fm_dim + 1))  # [side, k]: the side's pooled factors summed
    for i in range(lo, hi):
        for s in range(n_slots):
            pool_bag(W, loc, offs[s, i], offs[s, i + 1], dims[s], x, starts[s])
        w = wide_logit_row(x, starts, fm_dim, sides)
        z = w + deep[i - lo]
        probs[i] = 1.0 / (1.0 + math.exp(-z))
        wide[i] = w
        g = 1.0 / (1.0 + math.exp(-(z + offset[i]))) - labels[i]
        for k in range(1, fm_dim + 1):
            side_sum[0, k] = 0.0
            side_sum[1, k] = 0.0
            for s in range(n_slots):
                side_sum[sides[s], k] += np.float64(x[starts[s] + k])
        for s in range(n_slots):
            a, b = offs[s, i], offs[s, i + 1]
            if b <= a:
                continue
            gs = g / (b - a)  # d pooled / d row = 1 / bag size
            kind, lr = kinds[s], lrs[s]
            for j in range(a, b):
                r = loc[j]
                if r < 0:  # not admitted: looks up as zeros, learns nothing
                    continue
                update_coord(kind, W, S1, S2, r, 0, gs, bias_lrs[s], betas[s], l1s[s], l2s[s])
                for k in range(1, fm_dim + 1):
                    gk = gs * side_sum[1 - sides[s], k]  # d wide / d factor: the other side
                    update_coord(kind, W, S1, S2, r, k, gk, lr, betas[s], l1s[s], l2s[s])
