"""The trainer's exploration hook: user clusters and Diag-LinUCB statistics from labeled events.

Per batch, after the CTR step: each event's user tower (every user-side slot pooled as the CTR
model sees it, :func:`bandit.context.user_tower` — so users without a user-ID row are placed by
their profile features) feeds an online k-means whose centroids define the context coordinates;
each event then adds its reward to the statistics of its item under its context. The context is
the one logged with the impression when there is one — the update must use what the server
actually used to score — and otherwise the user's current top-K clusters, computed from the same
tower the service computes.

Cluster counts decay with ``bandit_cluster_half_life_s`` of event time (``OnlineKMeans``), so
the centroids follow drifting users. Churn — the share of a batch's users whose nearest
centroid changes because of that batch's centroid update — is counted for metrics
(``reassigned`` / ``assigned``): it is what would blur the meaning of the (item, cluster)
statistics, while a user moving because its own rows learned is the context doing its job.

Duplicates (at-least-once delivery, replays after a crash) are skipped by event id inside
:class:`bandit.diag_linucb.DiagLinUCB`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bandit.clusters import OnlineKMeans
from bandit.context import context_for, user_slots, user_tower
from bandit.diag_linucb import DiagLinUCB
from featurestore.events import AnyLabeledEvent
from featurestore.featurize import bandit_keys
from featurestore.schema import ModelConfig, SlotSide
from freshrec.eventclock import EventClock
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from trainer.checkpoint import load_arrays, save_arrays
from trainer.learner import OnlineLearner

log = logging.getLogger("freshrec.trainer")


@dataclass
class ExplorationHook:
    """Owns the bandit statistics and the user clusters; checkpointed with the trainer."""

    bandit: DiagLinUCB
    clusters: OnlineKMeans
    top_k: int
    config: ModelConfig
    seed: int = 0
    cluster_half_life_s: float = 0.0
    metrics: TrainerMetrics | None = None
    assigned: int = 0  # users placed by the clusters (cumulative), churn's denominator
    reassigned: int = 0  # ... whose nearest centroid changed with their batch's update
    # The trainer's event-time watermark: rewards are time-stamped no later than it, so one
    # event with a skewed clock cannot age (decay) every item's statistics at once.
    clock: EventClock | None = None

    @classmethod
    def from_settings(cls, settings: Settings, config: ModelConfig,
                      metrics: TrainerMetrics | None = None) -> ExplorationHook:
        if config.user_slot is None:
            raise ValueError("exploration needs a slot with source = 'user_id'")
        width = sum(dim for _, dim in user_slots(config))
        return cls(
            bandit=DiagLinUCB(settings.bandit_clusters, lam=settings.bandit_lambda,
                              half_life_s=settings.bandit_half_life_s),
            clusters=OnlineKMeans(settings.bandit_clusters, width, seed=settings.trainer_seed,
                                  half_life_s=settings.bandit_cluster_half_life_s),
            top_k=settings.bandit_top_k,
            config=config,
            seed=settings.trainer_seed,
            cluster_half_life_s=settings.bandit_cluster_half_life_s,
            metrics=metrics,
        )

    def user_vectors(self, learner: OnlineLearner, events: list[AnyLabeledEvent]) -> np.ndarray:
        """The user tower of each event from the current tables (zeros where no row)."""
        batch = learner.featurizer.featurize_events(events, SlotSide.USER)

        def lookup(slot: str, ids: np.ndarray) -> np.ndarray:
            table = learner.tables[slot]
            return table.gather(table.find(ids))

        return user_tower(self.config, batch, lookup)

    def contexts(self, events: list[AnyLabeledEvent], vectors: np.ndarray
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

    def on_batch(self, events: list[AnyLabeledEvent], learner: OnlineLearner) -> None:
        """Refine the clusters with this batch's users, then add the rewards."""
        vectors = self.user_vectors(learner, events)
        known = np.any(vectors != 0, axis=1)
        if known.any():
            ts = float(self._times(events).max())  # the clock caps a skewed event
            before = (self.clusters.predict(vectors[known])
                      if self.clusters.n_initialized == self.clusters.n_clusters else None)
            reseeded = self.clusters.reseeded
            self.clusters.partial_fit(vectors[known], ts=ts)
            if before is not None:
                moved = int((self.clusters.predict(vectors[known]) != before).sum())
                self.assigned += len(before)
                self.reassigned += moved
                if self.metrics is not None:
                    self.metrics.cluster_assigned.inc(len(before))
                    self.metrics.cluster_reassigned.inc(moved)
                    self.metrics.cluster_reseeded.inc(self.clusters.reseeded - reseeded)
        mask, clusters, weights = self.contexts(events, vectors)
        if not mask.any():
            return
        chosen = [e for e, m in zip(events, mask, strict=True) if m]
        self.bandit.update(
            bandit_keys([e.item_id for e in chosen]),
            clusters[mask], weights[mask],
            np.fromiter((e.label for e in chosen), dtype=np.float64, count=len(chosen)),
            self._times(chosen),
            event_ids=[e.event_id for e in chosen],
        )

    def _times(self, events: list[AnyLabeledEvent]) -> np.ndarray:
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
        """Inverse of :meth:`save`.

        Clusters of another width (a checkpoint from before the user tower, or of a config
        with other user-side slots) are dropped: their centroids live in another space. They
        rebuild from the next batches; the statistics keep their indices.
        """
        self.bandit = DiagLinUCB.from_arrays(load_arrays(directory / "bandit"))
        clusters = OnlineKMeans.from_arrays(load_arrays(directory / "clusters"), seed=self.seed)
        if clusters.dim == self.clusters.dim:
            self.clusters = clusters
        else:
            log.warning("checkpointed clusters have dim %d, the user tower %d: starting afresh",
                        clusters.dim, self.clusters.dim)
