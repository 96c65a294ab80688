"""The learner of one trainer rank: embedding rows live with the rank that owns their bucket.

Every feature ID falls into bucket :func:`~featurestore.snapshot_keys.bucket_of` (the function
the bucketed snapshot layout uses, so a rank publishes exactly the chains it owns), and bucket
``k`` belongs to rank ``k % world``. One step of ``R`` ranks, each on its own share of events:

1. **Fetch.** Each rank sends the distinct IDs of its share (per slot, with their number of
   occurrences and newest event time) to their owners with one ``all_to_all``. The owner counts
   and admits them in its own table — every occurrence of an ID anywhere reaches the same
   table, so the frequency filter is exact — and returns each ID's row (embedding and
   optimizer state) and how many of its leading occurrences were not admitted yet.
2. **Learn.** Each rank learns its share exactly as one process does (:class:`OnlineLearner`:
   the wide part example by example, the deep part in slices), on its copy of the rows.
   Every slice's dense gradient is all-reduced (weighted by the slice's share of the step's
   examples on all ranks), so the dense weights stay identical on every rank.
3. **Push.** The change of every fetched row goes back to its owner the way the IDs came; the
   owner adds the changes of all ranks.

What differs from one process on the same events: rows that two ranks use in one step learn
from both ranks' examples starting from the same value and the changes add (one process would
chain them), and a dense slice holds the step's ``micro_batch`` examples of every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from featurestore.featurize import SparseBatch
from featurestore.schema import ModelConfig
from featurestore.snapshot_keys import bucket_of
from featurestore.table import EmbeddingTable
from freshrec.settings import DEFAULT_MICRO_BATCH
from trainer.learner import OnlineLearner, StepResult, _WorkingSet
from trainer.model import clear_grads, dense_step

# Buckets when the snapshot layout is unbucketed (FRESHREC_SNAPSHOT_BUCKETS=0) but there are
# ranks: ownership needs buckets all the same. 64 is the measured sweet spot of docs/scale.md.
DEFAULT_RANK_BUCKETS = 64


@dataclass(frozen=True)
class Ranks:
    """This process's place among the trainer ranks, and the bucket ownership rule."""

    rank: int
    world: int
    n_buckets: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} outside world size {self.world}")
        if self.n_buckets < self.world:
            raise ValueError(f"{self.n_buckets} buckets cannot give each of {self.world} "
                             "ranks one")

    def owner_of(self, ids: np.ndarray) -> np.ndarray:
        """The rank owning each ID: its bucket modulo the number of ranks."""
        return bucket_of(ids, self.n_buckets) % self.world

    def owned_buckets(self) -> list[int]:
        return list(range(self.rank, self.n_buckets, self.world))

    def partitions(self, n_partitions: int) -> list[int]:
        """The events-topic partitions this rank consumes: ``p % world == rank``."""
        return [p for p in range(n_partitions) if p % self.world == self.rank]


@dataclass
class ExchangeBytes:
    """Bytes this rank sent in the step's collectives (for bench/scaleout.py)."""

    all_to_all: int = 0
    all_reduce: int = 0


class _FetchedRows:
    """The rows of one slot fetched from their owners, in request order: the working set's
    :class:`~trainer.learner.RowSource`, keeping the learned values for the push."""

    def __init__(self, emb: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> None:
        self.start = (emb, s1, s2)
        self.end = (emb.copy(), s1.copy(), s2.copy())

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(a[rows] for a in self.start)  # type: ignore[return-value]

    def write_rows(self, rows: np.ndarray, emb: np.ndarray, s1: np.ndarray,
                   s2: np.ndarray) -> None:
        for a, v in zip(self.end, (emb, s1, s2), strict=True):
            a[rows] = v

    def deltas(self) -> np.ndarray:
        """``(n, 3 * dim)`` float32 changes (emb, state1, state2) of every fetched row."""
        return np.concatenate([e - s for e, s in zip(self.end, self.start, strict=True)],
                              axis=1)


@dataclass
class _Request:
    """What one step asked for: per slot the distinct IDs, and the flat request order."""

    uniq: list[np.ndarray] = field(default_factory=list)
    inverse: list[np.ndarray] = field(default_factory=list)
    counts: list[np.ndarray] = field(default_factory=list)
    order: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    send: list[int] = field(default_factory=list)
    recv: list[int] = field(default_factory=list)


class ShardedLearner(OnlineLearner):
    """An :class:`OnlineLearner` whose tables hold only this rank's buckets.

    Each step is collective: every rank calls :meth:`step_batch` once per step, with
    ``step_counts`` set to every rank's number of examples in it (the trainer exchanges them
    first), an empty share included.
    """

    def __init__(self, config: ModelConfig, ranks: Ranks, seed: int = 0,
                 threads: int | None = 1, micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        super().__init__(config, seed=seed, threads=threads, micro_batch=micro_batch)
        self.ranks = ranks
        self.step_counts = np.zeros(ranks.world, dtype=np.int64)
        self.sent = ExchangeBytes()
        self._slice_weight: list[float] = []
        # Per slot, the distinct IDs of this rank's last step and their rows as it learned them.
        self._step_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # --- one step ------------------------------------------------------------------------

    def step_batch(self, batch: SparseBatch, labels: np.ndarray, ts: np.ndarray,
                   learn: bool = True, logit_offset: np.ndarray | None = None) -> StepResult:
        if not learn:
            return super().step_batch(batch, labels, ts, learn=False)
        n = batch.size
        if n != int(self.step_counts[self.ranks.rank]):
            raise ValueError(f"step of {n} examples announced as "
                             f"{int(self.step_counts[self.ranks.rank])}")
        y = np.ascontiguousarray(labels, dtype=np.float64)
        offset = (np.zeros(n) if logit_offset is None
                  else np.ascontiguousarray(logit_offset, dtype=np.float64))
        self.mutations += 1
        request, rows, fetched = self._fetch(batch, np.asarray(ts, dtype=np.float64))
        ws = _WorkingSet(self, batch, rows, sources=fetched)
        n_slices = int(-(-self.step_counts.max() // self.micro_batch))
        self._slice_weight = [
            self._share(i) for i in range(n_slices)]
        probs = self._learn(ws, y, offset, n_slices)
        ws.write_back()
        self._step_rows = {name: (request.uniq[s], fetched[name].end[0])
                           for s, name in enumerate(self.slot_names)}
        self._push(request, fetched)
        return StepResult(probs, np.asarray(labels), rows, batch)

    def row_vectors(self, slot: str, ids: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` as this rank learned them in its last step (zeros for IDs
        without a row, or not in that step): the table holds only the owned buckets, and the
        exploration hook asks for the rows of the step's own users. A row another rank used
        in the same step differs from its owner's sum of both changes."""
        uniq, emb = self._step_rows.get(slot, (np.empty(0, np.int64), None))
        dim = self.tables[slot].config.dim
        out = np.zeros((len(ids), dim), dtype=np.float32)
        if emb is None or not len(uniq):
            return out
        pos = np.minimum(np.searchsorted(uniq, ids), len(uniq) - 1)
        found = uniq[pos] == ids
        out[found] = emb[pos[found]]
        return out

    def _share(self, i: int) -> float:
        """This rank's share of slice ``i``'s examples over all ranks (its gradient weight)."""
        mb = self.micro_batch
        sizes = np.clip(self.step_counts - i * mb, 0, mb)
        return float(sizes[self.ranks.rank]) / float(sizes.sum())

    def _dense_update(self, loss: torch.Tensor | None, slice_index: int) -> None:
        """All-reduce the slice's gradient (each rank's mean weighted by its share), then the
        same optimizer step on every rank: the weights stay identical."""
        clear_grads(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if loss is not None:
            (loss * self._slice_weight[slice_index]).backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(flat)
        self.sent.all_reduce += flat.numel() * flat.element_size()
        at = 0
        for p in params:
            k = p.numel()
            p.grad = flat[at:at + k].view_as(p).clone()
            at += k
        dense_step(self.optimizer)

    # --- the exchange --------------------------------------------------------------------

    def _all_to_all(self, send: np.ndarray, send_counts: list[int], recv_counts: list[int],
                    width: int) -> np.ndarray:
        """Rows of ``width`` values to each rank (``send`` grouped by rank), received likewise."""
        out = torch.empty((sum(recv_counts), width), dtype=torch.from_numpy(send[:0]).dtype)
        dist.all_to_all_single(out, torch.from_numpy(np.ascontiguousarray(send)),
                               output_split_sizes=list(recv_counts),
                               input_split_sizes=list(send_counts))
        self.sent.all_to_all += send.nbytes
        return out.numpy()

    def _fetch(self, batch: SparseBatch, ts: np.ndarray
               ) -> tuple[_Request, dict[str, np.ndarray], dict[str, _FetchedRows]]:
        """Send this share's IDs to their owners, serve the IDs others sent, get the rows."""
        req = _Request()
        cols = []
        for s, name in enumerate(self.slot_names):
            slot = batch.slots[name]
            uniq, inverse, counts = np.unique(slot.ids, return_inverse=True,
                                              return_counts=True)
            newest = np.full(len(uniq), -np.inf)
            np.maximum.at(newest, inverse, np.repeat(ts, slot.lengths))
            req.uniq.append(uniq)
            req.inverse.append(inverse.reshape(-1))
            req.counts.append(counts)
            cols.append(np.stack([uniq, np.full(len(uniq), s), counts,
                                  newest.view(np.int64)], axis=1))
        flat = np.concatenate(cols) if cols else np.empty((0, 4), np.int64)
        owner = self.ranks.owner_of(flat[:, 0])
        req.order = np.argsort(owner, kind="stable")
        req.send = np.bincount(owner, minlength=self.ranks.world).tolist()
        req.recv = self._all_to_all(np.array(req.send, dtype=np.int64).reshape(-1, 1),
                                    [1] * self.ranks.world, [1] * self.ranks.world,
                                    1).reshape(-1).tolist()
        asked = self._all_to_all(flat[req.order], req.send, req.recv, 4)
        served = self._serve(asked)
        got = np.empty_like(served, shape=(len(flat), served.shape[1]))
        got[req.order] = self._all_to_all(served, req.recv, req.send, served.shape[1])
        rows: dict[str, np.ndarray] = {}
        fetched: dict[str, _FetchedRows] = {}
        at, d = 0, self.dim_max
        for s, name in enumerate(self.slot_names):
            u = len(req.uniq[s])
            part = got[at:at + u]
            at += u
            dim = int(self.dims[s])
            fetched[name] = _FetchedRows(part[:, 1:1 + dim].copy(),
                                         part[:, 1 + d:1 + d + dim].copy(),
                                         part[:, 1 + 2 * d:1 + 2 * d + dim].copy())
            rows[name] = _admitted_positions(req.inverse[s], req.counts[s],
                                             part[:, 0].astype(np.int64))
        return req, rows, fetched

    def _serve(self, asked: np.ndarray) -> np.ndarray:
        """Count and admit the IDs other ranks (and this one) asked for, in rank order; each
        request's not-yet-admitted leading occurrences and its row, ``(n, 1 + 3 * dim_max)``."""
        d = self.dim_max
        out = np.zeros((len(asked), 1 + 3 * d), dtype=np.float32)
        self._served: list[tuple[str, np.ndarray, np.ndarray]] = []
        for s, name in enumerate(self.slot_names):
            sel = np.flatnonzero(asked[:, 1] == s)
            if not len(sel):
                continue
            ids, counts = asked[sel, 0], asked[sel, 2]
            newest = asked[sel, 3].copy().view(np.float64)
            table = self.tables[name]
            occ_rows = table.lookup(np.repeat(ids, counts), np.repeat(newest, counts))
            ends = np.cumsum(counts)
            row = occ_rows[ends - 1]
            skipped = np.add.reduceat((occ_rows < 0).astype(np.int64), ends - counts)
            out[sel, 0] = np.where(row >= 0, skipped, counts)
            live = row >= 0
            e, s1, s2 = table.read_rows(row[live])
            dim = int(self.dims[s])
            out[sel[live], 1:1 + dim] = e
            out[sel[live], 1 + d:1 + d + dim] = s1
            out[sel[live], 1 + 2 * d:1 + 2 * d + dim] = s2
            self._served.append((name, sel[live], row[live]))
        return out

    def _push(self, req: _Request, fetched: Mapping[str, _FetchedRows]) -> None:
        """Send every fetched row's change to its owner; add the changes of all ranks."""
        d = self.dim_max
        for table, uniq, summed, _users in self._owned_changes(req, fetched):
            dim = table.config.dim
            e, s1, s2 = table.read_rows(uniq)
            table.write_rows(uniq, e + summed[:, :dim], s1 + summed[:, d:d + dim],
                             s2 + summed[:, 2 * d:2 * d + dim])

    def _owned_changes(self, req: _Request, fetched: Mapping[str, _FetchedRows]
                       ) -> Iterator[tuple[EmbeddingTable, np.ndarray, np.ndarray, np.ndarray]]:
        """Exchange the fetched rows' changes; per owned table, ``(table, rows, summed,
        users)``: its distinct rows, the sum of every rank's change to each (``(emb, s1, s2)``
        side by side, ``dim_max`` apart) and how many ranks' examples used it."""
        d = self.dim_max
        deltas = np.zeros((sum(req.send), 3 * d), dtype=np.float32)
        at = 0
        for s, name in enumerate(self.slot_names):
            u, dim = len(req.uniq[s]), int(self.dims[s])
            change = fetched[name].deltas()
            for j in range(3):
                deltas[at:at + u, j * d:j * d + dim] = change[:, j * dim:(j + 1) * dim]
            at += u
        got = self._all_to_all(deltas[req.order], req.send, req.recv, 3 * d)
        for name, sel, rows in self._served:
            uniq, inverse = np.unique(rows, return_inverse=True)
            summed = np.zeros((len(uniq), 3 * d), dtype=np.float32)
            np.add.at(summed, inverse.reshape(-1), got[sel])
            users = np.bincount(inverse.reshape(-1), minlength=len(uniq))
            yield self.tables[name], uniq, summed, users


def _admitted_positions(inverse: np.ndarray, counts: np.ndarray, skipped: np.ndarray
                        ) -> np.ndarray:
    """Per occurrence: its distinct ID's index (a working-set row), or -1 for the leading
    ``skipped`` occurrences of an ID that were not admitted yet (as one process reads them)."""
    if not len(inverse):
        return np.empty(0, dtype=np.int64)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(counts) - counts
    nth = np.empty(len(inverse), dtype=np.int64)
    nth[order] = np.arange(len(inverse)) - starts[inverse[order]]
    return np.where(nth >= skipped[inverse], inverse, -1).astype(np.int64)
