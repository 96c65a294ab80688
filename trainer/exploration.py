"""The trainer's exploration hook: user clusters and Diag-LinUCB statistics from labeled events.

Per batch, after the CTR step: each event's user tower (every user-side slot pooled as the CTR
model sees it, :func:`bandit.context.user_tower` — so users without a user-ID row are placed by
their profile features) feeds an online k-means whose centroids define the context coordinates;
each event then adds its reward to the statistics of its item under its context. The context is
the one logged with the impression when there is one — the update must use what the server
actually used to score — and otherwise the user's current top-K clusters, computed from the same
tower the service computes. The tower, the clustering and the contexts run once per distinct
user of the batch (by its user-side IDs), each user weighing as many events as it has: the
same result as once per event, at a fraction of the cost on real streams, which repeat users
within a batch. The work splits into :meth:`ExplorationHook.share` (what a batch contributes),
:meth:`~ExplorationHook.refine` (the clusters) and :meth:`~ExplorationHook.reward` (the
statistics), which the trainer ranks' hook (``trainer.rank_exploration``) composes across
ranks.

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
from featurestore.distinct import distinct_examples, take_examples
from featurestore.events import AnyLabeledEvent
from featurestore.featurize import Featurizer, SlotIds, SparseBatch, bandit_keys
from featurestore.labeled_batch import BatchContexts, LabeledBatch
from featurestore.schema import ModelConfig, SlotKind, SlotSide
from freshrec.eventclock import EventClock
from freshrec.metrics import TrainerMetrics
from freshrec.settings import Settings
from trainer.checkpoint import load_arrays, save_arrays
from trainer.learner import OnlineLearner

log = logging.getLogger("freshrec.trainer")


@dataclass
class Share:
    """What the exploration update needs of one batch (or of one rank's part of a step):
    small, and picklable for the ranks' exchange (``trainer.rank_exploration``)."""

    vectors: np.ndarray  # float32 (users, width): the tower of each distinct user
    inverse: np.ndarray  # int (events,): each event's user row
    logged: BatchContexts | None  # the contexts logged with the events
    items: np.ndarray  # int64 (events,): the statistics' key of each event's item
    labels: np.ndarray  # float64 (events,)
    ts: np.ndarray  # float64 (events,), capped at the event clock
    event_ids: list[str]

    def events_per_user(self) -> np.ndarray:
        return np.bincount(self.inverse, minlength=len(self.vectors))

    def newest(self) -> float | None:
        return float(self.ts.max()) if len(self.ts) else None


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

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the hook's kernels before the first batch,
        on scratch objects: without this the first batches pay seconds of compiling in a fresh
        install. This hook's state is left as it was."""
        width = self.clusters.dim
        points = np.ones((2, width), dtype=np.float32)
        points[1, 0] = 2.0
        scratch = OnlineKMeans(2, width)
        for _ in range(2):  # seeding, then absorbing
            scratch.partial_fit(points, ts=0.0, weights=np.ones(2))
        context_for(points, scratch.centroids, 1, counts=scratch.counts)
        DiagLinUCB(2).update(np.ones(1, dtype=np.int64), np.zeros((1, 1), dtype=np.int64),
                             np.ones((1, 1)), np.ones(1), 0.0, event_ids=["warm-up"])
        one = SparseBatch(1, {"warm-up": SlotIds(np.ones(1, dtype=np.int64),
                                                 np.array([0, 1], dtype=np.int64))})
        take_examples(one, distinct_examples(one)[0])
        user_tower(self.config, SparseBatch(1, {
            name: SlotIds(np.ones(1, dtype=np.int64), np.array([0, 1], dtype=np.int64))
            for name, _ in user_slots(self.config)}),
            lambda _slot, ids: np.zeros((len(ids), 1), dtype=np.float32))

    def distinct_user_vectors(self, learner: OnlineLearner,
                              batch: LabeledBatch | list[AnyLabeledEvent]
                              ) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors, inverse)``: the user tower of each distinct user of the batch from the
        current tables (zeros where no row), and per event the index of its user's vector.

        Users are distinct by their user-side IDs (``featurestore.distinct``): the tower
        depends on nothing else, and a batch repeats them (one request shows several items,
        a session yields several events), so the tower, the clustering and the contexts run
        once per user, not once per event.
        """
        batch = _as_batch(batch, learner)
        users = SparseBatch(batch.sparse.size, {
            s.name: batch.sparse.slots[s.name] for s in self.config.slots
            if s.side is SlotSide.USER})
        first, inverse = distinct_examples(users)
        return (user_tower(self.config, take_examples(users, first), learner.row_vectors),
                inverse)

    def user_vectors(self, learner: OnlineLearner,
                     batch: LabeledBatch | list[AnyLabeledEvent]) -> np.ndarray:
        """The user tower of each event from the current tables (zeros where no row)."""
        vectors, inverse = self.distinct_user_vectors(learner, batch)
        return vectors[inverse]

    def contexts(self, batch: LabeledBatch | list[AnyLabeledEvent], vectors: np.ndarray,
                 inverse: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(mask, clusters, weights)``: the context of each event (logged, else computed).

        ``vectors``: the user towers, one per event, or one per distinct user with
        ``inverse`` mapping each event to its row. Contexts of different K are padded with zero
        weights, which add nothing to ``d`` or ``b``. ``mask`` is False where no context exists
        yet (no clusters before the first embeddings arrive).
        """
        if not isinstance(batch, LabeledBatch):
            batch = LabeledBatch.of_events(batch, Featurizer(self.config))
        n = len(batch)
        return self._contexts(batch.contexts, n, vectors,
                              np.arange(n) if inverse is None else inverse)

    def _contexts(self, logged: BatchContexts | None, n: int, vectors: np.ndarray,
                  inverse: np.ndarray, wanted: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`contexts` of ``n`` events from their logged contexts and user towers; only
        of the ``wanted`` ones (bool mask; the others are left without a context)."""
        k = self.top_k
        width = max(k, logged.clusters.shape[1] if logged is not None else 0)
        clusters = np.zeros((n, width), dtype=np.int64)
        weights = np.zeros((n, width), dtype=np.float64)
        mask = np.zeros(n, dtype=bool)
        wanted = np.ones(n, dtype=bool) if wanted is None else np.asarray(wanted, dtype=bool)
        if logged is None:
            need = np.flatnonzero(wanted)
        else:
            need = np.flatnonzero(wanted & (logged.counts < 0))
            # Logged clusters this bandit does not have (another cluster count) are dropped;
            # the rest keep their order.
            present = wanted & (logged.counts >= 0)
            valid = ((np.arange(logged.clusters.shape[1])[None, :] < logged.counts[:, None])
                     & (logged.clusters < self.bandit.n_clusters))
            for i in np.flatnonzero(present & valid.any(axis=1)).tolist():
                keep = valid[i]
                m = int(keep.sum())
                clusters[i, :m] = logged.clusters[i, keep]
                weights[i, :m] = logged.weights[i, keep]
                mask[i] = True
        if len(need) and self.clusters.n_initialized:
            users, at = np.unique(inverse[need], return_inverse=True)
            cl, w = context_for(vectors[users], self.clusters.centroids, k,
                                counts=self.clusters.counts)
            clusters[need, : cl.shape[1]] = cl[at]
            weights[need, : w.shape[1]] = w[at]
            mask[need] = True
        return mask, clusters, weights

    def on_batch(self, batch: LabeledBatch | list[AnyLabeledEvent],
                 learner: OnlineLearner) -> None:
        """Refine the clusters with this batch's users, then add the rewards."""
        share = self.share(batch, learner)
        self.refine(share.vectors, share.events_per_user(), share.newest())
        self.reward(share)

    def share(self, batch: LabeledBatch | list[AnyLabeledEvent],
              learner: OnlineLearner) -> Share:
        """What the clusters and the statistics need of a batch, without the batch."""
        batch = _as_batch(batch, learner)
        vectors, inverse = self.distinct_user_vectors(learner, batch)
        return Share(vectors, inverse, batch.contexts, self._item_keys(batch),
                     np.asarray(batch.labels, dtype=np.float64),
                     self._times(batch.ts),  # the clock caps a skewed event
                     batch.event_ids())

    def refine(self, vectors: np.ndarray, events: np.ndarray, ts: float | None,
               counted: np.ndarray | None = None) -> None:
        """Move the clusters towards the users ``vectors`` (each weighing its ``events``) at
        event time ``ts``; churn is counted over the ``counted`` rows (default: all)."""
        known = np.any(vectors != 0, axis=1)
        if not known.any():
            return
        points = vectors[known]
        # Each distinct user weighs as many events as it has in the batch: the clusters
        # learn exactly what they would from one tower per event.
        events = np.asarray(events)[known]
        before = (self.clusters.predict(points)
                  if self.clusters.n_initialized == self.clusters.n_clusters else None)
        reseeded = self.clusters.reseeded
        self.clusters.partial_fit(points, ts=ts, weights=events, nearest=before)
        if before is None:
            return
        if counted is not None:
            events = np.where(np.asarray(counted)[known], events, 0)
        moved = int(events[self.clusters.predict(points) != before].sum())
        assigned = int(events.sum())
        self.assigned += assigned
        self.reassigned += moved
        if self.metrics is not None:
            self.metrics.cluster_assigned.inc(assigned)
            self.metrics.cluster_reassigned.inc(moved)
            self.metrics.cluster_reseeded.inc(self.clusters.reseeded - reseeded)

    def reward(self, share: Share, keep: np.ndarray | None = None) -> None:
        """Add the rewards of ``share``'s events (those in ``keep``) under their contexts."""
        mask, clusters, weights = self._contexts(share.logged, len(share.items), share.vectors,
                                                 share.inverse, keep)
        if not mask.any():
            return
        self.bandit.update(
            share.items[mask], clusters[mask], weights[mask], share.labels[mask],
            share.ts[mask],
            event_ids=[share.event_ids[i] for i in np.flatnonzero(mask).tolist()],
        )

    def _item_keys(self, batch: LabeledBatch) -> np.ndarray:
        """The statistics' key of each event's item: a categorical item slot's IDs are those
        keys already (``featurestore.featurize.bandit_keys``)."""
        item = self.config.item_slot
        if item.source == "item_id" and item.kind is SlotKind.CATEGORICAL:
            return batch.sparse.slots[item.name].ids
        return bandit_keys([e.item_id for e in batch.events])

    def _times(self, ts: np.ndarray) -> np.ndarray:
        """Event times capped at the event clock."""
        ts = np.array(ts, dtype=np.float64)
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


def _as_batch(batch: LabeledBatch | list[AnyLabeledEvent], learner: OnlineLearner
              ) -> LabeledBatch:
    return (batch if isinstance(batch, LabeledBatch)
            else LabeledBatch.of_events(batch, learner.featurizer))
