"""The exploration hook of a trainer rank: one set of clusters, statistics sharded by item.

Diag-LinUCB statistics are sums over events, so they shard like the embedding rows: the
statistics of an item live with the rank that owns the item's bucket
(:meth:`trainer.sharded.Ranks.owner_of`, the bucket its snapshot chain is published under). The
clusters are the coordinates every statistic is indexed by, so every rank holds the same ones.

Per step, after the learning step (every rank, an idle one too, since it is a collective):

1. each rank builds its :class:`~trainer.exploration.Share` of the step — the user tower of
   each distinct user of its events (from the rows as it learned them,
   :meth:`trainer.sharded.ShardedLearner.row_vectors`), and per event its item, reward, time,
   id and logged context;
2. one ``all_gather_object`` gives every rank every share;
3. every rank refines its clusters with all the towers, in rank order, from the same state
   and seed: the clusters stay identical without a broadcast;
4. every rank adds the rewards of the events whose item it owns, from any rank, under their
   logged context or the one the refined clusters give their user — exactly what one process
   computes for them.

What differs from one process on the same events: the towers are each rank's view of the
step's rows (a row two ranks used differs from the owner's sum by the other rank's change),
and the clusters see the step's users in rank order rather than in consumption order.
Duplicates are caught by the owner, which every copy of an event reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from featurestore.events import AnyLabeledEvent
from featurestore.labeled_batch import LabeledBatch
from trainer.exploration import ExplorationHook, Share
from trainer.learner import OnlineLearner
from trainer.sharded import Ranks


@dataclass
class RankExploration(ExplorationHook):
    """:class:`ExplorationHook` across ranks: every rank calls :meth:`on_batch` once per step."""

    ranks: Ranks | None = None

    def on_batch(self, batch: LabeledBatch | list[AnyLabeledEvent],
                 learner: OnlineLearner) -> None:
        """Refine the shared clusters with every rank's users, then add the rewards of the
        events whose item this rank owns (collective)."""
        if self.ranks is None:
            raise ValueError("a rank's exploration hook needs its Ranks")
        mine = self.share(batch, learner)
        shares: list[Share | None] = [None] * self.ranks.world
        dist.all_gather_object(shares, mine)
        everyone = [s for s in shares if s is not None]
        sizes = [len(s.vectors) for s in everyone]
        times = [t for t in (s.newest() for s in everyone) if t is not None]
        self.refine(np.concatenate([s.vectors for s in everyone]),
                    np.concatenate([s.events_per_user() for s in everyone]),
                    max(times) if times else None,
                    counted=np.repeat(np.arange(len(everyone)) == self.ranks.rank, sizes))
        for share in everyone:
            self.reward(share, keep=self.ranks.owner_of(share.items) == self.ranks.rank)
