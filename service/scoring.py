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

from bandit.context import context_for
from featurestore.featurize import Featurizer, encode_value
from featurestore.pooling import mean_pool
from featurestore.schema import ModelConfig, SlotSide
from service.snapshot import ServingSnapshot


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


class Scorer:
    """Scores candidates for one user against a :class:`ServingSnapshot`."""

    def __init__(self, config: ModelConfig, *, alpha: float, top_k_clusters: int) -> None:
        self.config = config
        self.featurizer = Featurizer(config)
        self.alpha = alpha
        self.top_k_clusters = top_k_clusters
        user = config.user_slot
        self.user_slot = user.name if user is not None else None

    def features(self, snapshot: ServingSnapshot, user_id: str, user_features: Mapping[str, Any],
                 items: Sequence[tuple[str, Mapping[str, Any]]]) -> np.ndarray:
        """The model input ``(n, sum of dims)``: user side pooled once, broadcast to every item."""
        user_rec = dict(user_features)
        user_rec["user_id"] = user_id
        item_recs = []
        for item_id, feats in items:
            rec = dict(feats)
            rec["item_id"] = item_id
            item_recs.append(rec)
        n = len(item_recs)
        ub = self.featurizer.featurize([user_rec], SlotSide.USER)
        ib = self.featurizer.featurize(item_recs, SlotSide.ITEM)
        parts = []
        for slot in self.config.slots:
            store = snapshot.slots[slot.name]
            if slot.side is SlotSide.USER:
                s = ub.slots[slot.name]
                pooled = mean_pool(store.lookup(s.ids), s.offsets)
                parts.append(np.broadcast_to(pooled, (n, slot.dim)))
            else:
                s = ib.slots[slot.name]
                parts.append(mean_pool(store.lookup(s.ids), s.offsets))
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    @staticmethod
    def forward(snapshot: ServingSnapshot, x: np.ndarray) -> np.ndarray:
        """p(click) for model inputs ``x``."""
        with torch.inference_mode():
            logits = snapshot.model(torch.from_numpy(x))
            return torch.sigmoid(logits).numpy().astype(np.float64)

    def context(self, snapshot: ServingSnapshot, user_id: str
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """The user's top-K cluster context, or None before any centroids were published.

        The user vector is the user slot's row (zeros for an unknown user, for whom
        :func:`bandit.context.context_for` falls back to the most populous clusters).
        """
        if snapshot.centroids is None or self.user_slot is None:
            return None
        uvec = snapshot.slots[self.user_slot].lookup(np.array([encode_value(user_id)]))
        cl, w = context_for(uvec, snapshot.centroids, self.top_k_clusters,
                            counts=snapshot.counts)
        return cl[0], w[0]

    def score(self, snapshot: ServingSnapshot, user_id: str, user_features: Mapping[str, Any],
              items: Sequence[tuple[str, Mapping[str, Any]]], top_k: int,
              explore: bool) -> ScoredItems:
        """Score every candidate; rank by ``pctr + alpha * bonus`` when exploring."""
        pctr = self.forward(snapshot, self.features(snapshot, user_id, user_features, items))
        n = len(items)
        k = min(top_k, n)
        bonus = np.zeros(n)
        ctx = None
        if explore and snapshot.bandit is not None:
            c = self.context(snapshot, user_id)
            if c is not None:
                clusters, weights = c
                # Clusters beyond the statistics' width cannot be scored; drop them.
                keep = clusters < snapshot.bandit.n_clusters
                clusters, weights = clusters[keep], weights[keep]
                if len(clusters):
                    item_ids = np.fromiter((encode_value(i) for i, _ in items), dtype=np.int64,
                                           count=n)
                    clock = snapshot.bandit.clock
                    _, bonus = snapshot.bandit.score(
                        item_ids, clusters, weights, now=clock if np.isfinite(clock) else None)
                    ctx = (clusters.tolist(), weights.tolist())
        score = pctr + self.alpha * bonus if ctx is not None else pctr
        order = np.argsort(-score, kind="stable")[:k]
        if ctx is not None:
            by_pctr = set(np.argsort(-pctr, kind="stable")[:k].tolist())
            explored = np.array([i not in by_pctr for i in order.tolist()], dtype=bool)
        else:
            explored = np.zeros(len(order), dtype=bool)
        return ScoredItems(pctr, bonus, score, order, explored, ctx)
