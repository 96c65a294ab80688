"""The trainer's exploration hook: user clusters and Diag-LinUCB statistics from labeled events.

Per batch, after the CTR step: the users' embeddings (rows of the slot keyed by ``user_id``)
feed an online k-means whose centroids define the context coordinates; each event then adds its
reward to the statistics of its item under its context. The context is the one logged with the
impression when there is one — the update must use what the server actually used to score — and
otherwise the user's current top-K clusters.

Duplicates (at-least-once delivery, replays after a crash) are skipped by event id inside
:class:`bandit.diag_linucb.DiagLinUCB`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bandit.clusters import OnlineKMeans
from bandit.context import context_for
from bandit.diag_linucb import DiagLinUCB
from featurestore.events import LabeledEvent
from featurestore.featurize import encode_value
from featurestore.schema import ModelConfig
from freshrec.eventclock import EventClock
from freshrec.settings import Settings
from trainer.checkpoint import load_arrays, save_arrays
from trainer.learner import OnlineLearner


@dataclass
class ExplorationHook:
    """Owns the bandit statistics and the user clusters; checkpointed with the trainer."""

    bandit: DiagLinUCB
    clusters: OnlineKMeans
    top_k: int
    user_slot: str
    seed: int = 0
    # The trainer's event-time watermark: rewards are time-stamped no later than it, so one
    # event with a skewed clock cannot age (decay) every item's statistics at once.
    clock: EventClock | None = None

    @classmethod
    def from_settings(cls, settings: Settings, config: ModelConfig) -> ExplorationHook:
        user = config.user_slot
        if user is None:
            raise ValueError("exploration needs a slot with source = 'user_id'")
        return cls(
            bandit=DiagLinUCB(settings.bandit_clusters, lam=settings.bandit_lambda,
                              half_life_s=settings.bandit_half_life_s),
            clusters=OnlineKMeans(settings.bandit_clusters, user.dim, seed=settings.trainer_seed),
            top_k=settings.bandit_top_k,
            user_slot=user.name,
            seed=settings.trainer_seed,
        )

    def user_vectors(self, learner: OnlineLearner, user_ids: list[str]) -> np.ndarray:
        """Current embeddings of users (zeros for users without a row)."""
        table = learner.tables[self.user_slot]
        ids = np.fromiter((encode_value(u) for u in user_ids), dtype=np.int64,
                          count=len(user_ids))
        return table.gather(table.find(ids))

    def contexts(self, events: list[LabeledEvent], vectors: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask, clusters, weights)``: the context of each event (logged, else computed).

        Contexts of different K are padded with zero weights, which add nothing to ``d`` or
        ``b``. ``mask`` is False where no context exists yet (no clusters before the first
        embeddings arrive).
        """
        n = len(events)
        k = self.top_k
        logged_k = max((len(e.context.clusters) for e in events if e.context), default=0)
        width = max(k, logged_k)
        clusters = np.zeros((n, width), dtype=np.int64)
        weights = np.zeros((n, width), dtype=np.float64)
        mask = np.zeros(n, dtype=bool)
        need = [i for i, e in enumerate(events) if e.context is None]
        for i, e in enumerate(events):
            ctx = e.context
            if ctx is not None and len(ctx.clusters) == len(ctx.weights):
                valid = [j for j, c in enumerate(ctx.clusters) if c < self.bandit.n_clusters]
                clusters[i, : len(valid)] = [ctx.clusters[j] for j in valid]
                weights[i, : len(valid)] = [ctx.weights[j] for j in valid]
                mask[i] = bool(valid)
        if need and self.clusters.n_initialized:
            idx = np.array(need)
            cl, w = context_for(vectors[idx], self.clusters.centroids, k,
                                counts=self.clusters.counts)
            clusters[idx, : cl.shape[1]] = cl
            weights[idx, : w.shape[1]] = w
            mask[idx] = True
        return mask, clusters, weights

    def on_batch(self, events: list[LabeledEvent], learner: OnlineLearner) -> None:
        """Refine the clusters with this batch's users, then add the rewards."""
        vectors = self.user_vectors(learner, [e.user_id for e in events])
        known = np.any(vectors != 0, axis=1)
        if known.any():
            self.clusters.partial_fit(vectors[known])
        mask, clusters, weights = self.contexts(events, vectors)
        if not mask.any():
            return
        chosen = [e for e, m in zip(events, mask, strict=True) if m]
        self.bandit.update(
            np.fromiter((encode_value(e.item_id) for e in chosen), dtype=np.int64,
                        count=len(chosen)),
            clusters[mask], weights[mask],
            np.fromiter((e.label for e in chosen), dtype=np.float64, count=len(chosen)),
            self._times(chosen),
            event_ids=[e.event_id for e in chosen],
        )

    def _times(self, events: list[LabeledEvent]) -> np.ndarray:
        ts = np.fromiter((e.ts for e in events), dtype=np.float64, count=len(events))
        if self.clock is not None and math.isfinite(self.clock.now):
            np.minimum(ts, self.clock.now, out=ts)
        return ts

    def on_expired(self, evicted: dict[str, np.ndarray], item_slot: str) -> int:
        """Drop the statistics of items whose embedding rows the TTL sweep evicted."""
        ids = evicted.get(item_slot)
        return self.bandit.evict(ids) if ids is not None and len(ids) else 0

    def save(self, directory: Path) -> None:
        """Statistics and clusters as raw arrays (no pickle)."""
        save_arrays(directory / "bandit", self.bandit.to_arrays())
        save_arrays(directory / "clusters", self.clusters.to_arrays())

    def load(self, directory: Path) -> None:
        """Inverse of :meth:`save`."""
        self.bandit = DiagLinUCB.from_arrays(load_arrays(directory / "bandit"))
        self.clusters = OnlineKMeans.from_arrays(load_arrays(directory / "clusters"),
                                                 seed=self.seed)
