"""Scoring one request: featurize, gather, pool, one forward pass, exploration bonus, top-k.

Kept free of HTTP so the same function scores in the service, in the benchmark (the "bare
forward" baseline) and in tests against an in-process reference. The pooling and the
concatenation order are exactly the trainer's (mean of each slot's bag, zeros for unknown IDs,
slots in model-config order), so a served pCTR equals the trainer's prediction for the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash
from numba import njit

from bandit.context import context_for, user_slots
from featurestore.featurize import Featurizer, SlotIds, bandit_keys
from featurestore.pooling import pool_bag
from featurestore.schema import ModelConfig, SlotKind, SlotSide
from service.candidates import CandidateIds, SlotColumn, UserIds, candidate_key
from service.snapshot import ServingSnapshot
from service.vectors import SlotVectors, row_of
from trainer.wide import wide_logits


@dataclass(frozen=True)
class ScoredItems:
    """The result for all candidates, in the order they were given, plus the ranking."""

    pctr: np.ndarray  # float64 (n,)
    bonus: np.ndarray  # float64 (n,), 0 when not exploring
    score: np.ndarray  # pctr + alpha * bonus
    order: np.ndarray  # candidate indices of the top_k, best first
    explored: np.ndarray  # bool (len(order),): in the top_k only thanks to the bonus
    context: tuple[list[int], list[float]] | None  # the bandit context used, if any


def explore_bucket(user_id: str) -> float:
    """A stable number in [0, 1) per user: the share ``bandit_explore_fraction`` is cut on it.

    Hashing the user (not the request) keeps a user consistently in or out of exploration, so
    the explored and unexplored cohorts can be compared like an A/B split.
    """
    return xxhash.xxh64_intdigest(user_id.encode(), seed=0x5EED) / 2.0**64


def pool_into(out: np.ndarray, col: int, store: SlotVectors, s: SlotIds) -> None:
    """``out[i, col:col + dim]`` = the mean of bag i's vectors, zeros for an empty bag.

    The trainer's pooling kernel (``featurestore.pooling.pool_bag``) on the snapshot's rows:
    unknown IDs map to the all-zero row 0, as unadmitted IDs pool as zeros in training.
    """
    store.state.pool(s.ids, s.offsets, out, col)  # rows and matrix from one committed state


def pool_candidates(out: np.ndarray, col: int, store: SlotVectors, column: SlotColumn,
                    rows: np.ndarray) -> None:
    """:func:`pool_into` for the candidates at ``rows`` of the candidate table's ``column``.

    The same rows and the same kernel as gathering the candidates' IDs first
    (``column.gather(rows)``) and pooling those, in one compiled call: the gather's and the
    lookup's numpy calls were ~10 % of a request.
    """
    st = store.state
    _pool_table_bags(st.keys, st.pos, st.matrix, column.start, column.length, column.flat,
                     rows, out, col)


@njit(cache=True)
def _pool_table_bags(keys: np.ndarray, pos: np.ndarray, matrix: np.ndarray, start: np.ndarray,
                     length: np.ndarray, flat: np.ndarray, cands: np.ndarray, out: np.ndarray,
                     col: int) -> None:
    total = 0
    for e in range(cands.shape[0]):
        total += length[cands[e]]
    rows = np.empty(total, dtype=np.int64)
    k = 0
    for e in range(cands.shape[0]):
        a = start[cands[e]]
        for j in range(a, a + length[cands[e]]):
            rows[k] = row_of(keys, pos, flat[j])
            k += 1
    dim = matrix.shape[1]
    k = 0
    for e in range(cands.shape[0]):
        m = length[cands[e]]
        pool_bag(matrix, rows, k, k + m, dim, out[e], col)
        k += m


def rank(pctr: np.ndarray, score: np.ndarray, k: int, exploring: bool,
         max_explored: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` by ``score`` (best first) and which of them are *explored*: in the top k
    only thanks to the bonus, i.e. not among the top k by ``pctr``.

    ``max_explored`` bounds the explored items of one response: past it, the lowest-scored
    explored items give their places back to the best-pCTR items they displaced, and the
    chosen items are ranked by score again. It bounds what exploration can cost a response
    (docs/exploration.md); None leaves the ranking to the score alone.
    """
    order = (-score).argsort(kind="stable")[:k]
    if not exploring:
        return order, np.zeros(len(order), dtype=bool)
    by_pctr = (-pctr).argsort(kind="stable")[:k].tolist()
    top = set(by_pctr)  # k is small: set lookups, not np.isin (~25 us each per request)
    shown = order.tolist()
    explored = [i not in top for i in shown]
    n_explored = sum(explored)
    if max_explored is not None and n_explored > max_explored:
        kept = [i for i, e in zip(shown, explored, strict=True) if e][:max_explored]
        taken = set(shown)
        back = [i for i in by_pctr if i not in taken][: n_explored - max_explored]
        chosen = np.array([i for i, e in zip(shown, explored, strict=True) if not e]
                          + kept + back, dtype=np.int64)
        order = chosen[(-score[chosen]).argsort(kind="stable")]
        explored = [i not in top for i in order.tolist()]
    return order, np.array(explored, dtype=bool)


class Scorer:
    """Scores candidates for one user against a :class:`ServingSnapshot`."""

    def __init__(self, config: ModelConfig, *, alpha: float, top_k_clusters: int,
                 item_cache_size: int = 200_000, max_explored: int | None = None) -> None:
        self.config = config
        self.max_explored = max_explored
        self.featurizer = Featurizer(config)
        self.alpha = alpha
        self.top_k_clusters = top_k_clusters
        self.tower_width = sum(dim for _, dim in user_slots(config))
        self.item_slots = [s.name for s in config.slots if s.side is SlotSide.ITEM]
        self.item_slot = config.item_slot  # a search over the slots on every access
        self.candidates = CandidateIds(self.featurizer, self.item_slots, item_cache_size)
        self.users = UserIds(self.featurizer)
        ends = np.cumsum([s.dim for s in config.slots]).tolist()
        self.width = ends[-1] if ends else 0
        self.columns = list(zip([0, *ends[:-1]], ends, strict=True))

    def features(self, snapshot: ServingSnapshot, user_id: str, user_features: Mapping[str, Any],
                 items: Sequence[tuple[str, Mapping[str, Any]]]) -> np.ndarray:
        """The model input ``(n, sum of dims)``: user side pooled once, broadcast to every item."""
        return self._features(snapshot, user_id, user_features, items)[0]

    def _features(self, snapshot: ServingSnapshot, user_id: str,
                  user_features: Mapping[str, Any],
                  items: Sequence[tuple[str, Mapping[str, Any]]],
                  table_rows: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model input, the candidates' rows in the candidate table (``CandidateIds``), and the
        user tower (the user-side columns, once). ``table_rows``: the rows, when the request
        parser has already found them in :attr:`candidates`."""
        n = len(items)
        user_ids = self.users.slot_ids(user_id, user_features)
        if table_rows is None:
            rows = self.candidates.table_rows([candidate_key(i, f) for i, f in items], items)
        else:
            rows = np.array(table_rows, dtype=np.int64)
        columns = self.candidates.columns
        # Each slot's pooled block is written straight into the model input (no concatenate).
        x = np.empty((n, self.width), dtype=np.float32)
        tower = np.empty(self.tower_width, dtype=np.float32)
        t = 0
        for slot, (a, b) in zip(self.config.slots, self.columns, strict=True):
            store = snapshot.slots[slot.name]
            if slot.side is SlotSide.USER:
                s = user_ids[slot.name]
                if len(s.ids) == 1:  # the usual case: one value, no pooling
                    tower[t : t + b - a] = store.vector(int(s.ids[0]))
                else:
                    pooled = np.empty((1, b - a), dtype=np.float32)
                    pool_into(pooled, 0, store, s)
                    tower[t : t + b - a] = pooled[0]
                x[:, a:b] = tower[t : t + b - a]
                t += b - a
            else:
                pool_candidates(x, a, store, columns[slot.name], rows)
        return x, rows, tower

    @staticmethod
    def forward(snapshot: ServingSnapshot, x: np.ndarray) -> np.ndarray:
        """p(click) for model inputs ``x`` (numpy forward, equal to the torch model's)."""
        return snapshot.dense.predict(x)

    @staticmethod
    def forward_torch(snapshot: ServingSnapshot, x: np.ndarray) -> np.ndarray:
        """The same through torch (the trainer's code path; kept as the benchmark baseline)."""
        with torch.inference_mode():
            deep = snapshot.model(torch.from_numpy(x)).numpy().astype(np.float64)
        m = snapshot.model
        z = deep + wide_logits(x, m.slot_starts, m.fm_dim, m.slot_sides)
        return 1.0 / (1.0 + np.exp(-z))

    def _bandit_keys(self, items: Sequence[tuple[str, Mapping[str, Any]]],
                     rows: np.ndarray) -> np.ndarray:
        """The statistics' key of each candidate (:func:`bandit_keys`, as the trainer uses).

        For a categorical item slot that is exactly the slot's (already computed) ID.
        """
        slot = self.item_slot
        if slot.kind is SlotKind.CATEGORICAL:
            return self.candidates.columns[slot.name].gather(rows).ids
        return bandit_keys([i for i, _ in items])

    def context(self, snapshot: ServingSnapshot, tower: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """The user's top-K cluster context from its user tower, or None without centroids.

        ``tower`` is the user-side part of the model input (:meth:`_features`), the vector the
        trainer clusters (:func:`bandit.context.user_tower`): a user without a user-ID row is
        placed by its profile slots; one with no row at all gets the most populous clusters.
        Centroids of another width (published before a config change) give no context.
        """
        c = snapshot.centroids
        if c is None or c.shape[1] != self.tower_width:
            return None
        cl, w = context_for(tower[None, :], c, self.top_k_clusters, counts=snapshot.counts)
        return cl[0], w[0]

    def score(self, snapshot: ServingSnapshot, user_id: str, user_features: Mapping[str, Any],
              items: Sequence[tuple[str, Mapping[str, Any]]], top_k: int,
              explore: bool, table_rows: Sequence[int] | None = None) -> ScoredItems:
        """Score every candidate; rank by ``pctr + alpha * bonus`` when exploring.

        ``table_rows``: each item's row in :attr:`candidates` (``parse_score_body`` finds them
        while it checks the body); without them the items are looked up by their values.
        """
        x, rows, tower = self._features(snapshot, user_id, user_features, items, table_rows)
        pctr = self.forward(snapshot, x)
        n = len(items)
        k = min(top_k, n)
        bonus = np.zeros(n)
        ctx = None
        if explore and snapshot.bandit is not None:
            c = self.context(snapshot, tower)
            if c is not None:
                clusters, weights = c
                # Clusters beyond the statistics' width cannot be scored; drop them.
                keep = clusters < snapshot.bandit.n_clusters
                clusters, weights = clusters[keep], weights[keep]
                if len(clusters):
                    keys = self._bandit_keys(items, rows)
                    clock = snapshot.bandit.clock
                    _, bonus = snapshot.bandit.score(
                        keys, clusters, weights, now=clock if np.isfinite(clock) else None)
                    ctx = (clusters.tolist(), weights.tolist())
        score = pctr + self.alpha * bonus if ctx is not None else pctr
        order, explored = rank(pctr, score, k, ctx is not None, self.max_explored)
        return ScoredItems(pctr, bonus, score, order, explored, ctx)
