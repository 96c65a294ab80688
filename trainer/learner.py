"""One online learning step: featurize -> table lookup -> predict -> learn, per example.

Kafka-free on purpose, so the training math is the same in the trainer process, in benchmarks
and in tests, and scale-out swaps the transport, not this module.

The model is ``logit = wide(x) + deep(x)`` over the slots' pooled embeddings ``x``
(``trainer.wide``, ``trainer.model``), learned at two speeds:

* the wide part (ID biases + FM factors, in the embedding rows) one example at a time in a
  compiled kernel: every example is predicted by a wide part that has learned every earlier
  example (staleness 0);
* the deep part (DCN-v2 in torch) in slices of ``micro_batch`` examples on top: each slice is
  predicted by the dense weights that learned every earlier slice (staleness < one slice). It
  learns the residual of the wide part (its loss adds the wide logit as predicted) and reads
  the pooled rows as inputs without writing to them: the rows are the wide part's, learned
  per example. (Back-propagating the deep loss into the rows as well measured no better —
  0.7681 vs 0.7687 AUC on MovieLens — and cost a third of the deep part's time.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.featurize import Featurizer, SparseBatch
from featurestore.hashmap import unique_rows
from featurestore.schema import ModelConfig
from featurestore.table import TableSet
from freshrec.settings import DEFAULT_MICRO_BATCH
from trainer import wide
from trainer.model import CTRModel, clear_grads, dense_step, make_dense_optimizer


@dataclass(frozen=True)
class StepResult:
    """What one step predicted (before learning) and the rows it touched."""

    probs: np.ndarray  # predictions made before the update
    labels: np.ndarray
    rows: dict[str, np.ndarray]  # slot -> row per ID (-1 = not admitted)
    batch: SparseBatch


class RowSource(Protocol):
    """Where a working set reads its rows from and writes them back to: a local table, or
    the rows a trainer rank fetched from their owners (:mod:`trainer.sharded`)."""

    def read_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
    def write_rows(self, rows: np.ndarray, emb: np.ndarray, s1: np.ndarray,
                   s2: np.ndarray) -> None: ...


class _WorkingSet:
    """A batch's distinct admitted rows of every table, copied into flat arrays (see
    :mod:`trainer.wide`), and the jagged local rows of every example."""

    def __init__(self, learner: OnlineLearner, batch: SparseBatch,
                 rows: Mapping[str, np.ndarray],
                 sources: Mapping[str, RowSource] | None = None) -> None:
        self.learner = learner
        self.sources: Mapping[str, RowSource] = (learner.tables if sources is None
                                                 else sources)
        self.uniq: list[np.ndarray] = []
        locs, base, flat = [], 0, 0
        offs = np.empty((len(learner.slot_names), batch.size + 1), dtype=np.int64)
        for s, name in enumerate(learner.slot_names):
            uniq, local = unique_rows(np.ascontiguousarray(rows[name], dtype=np.int64))
            self.uniq.append(uniq)
            locs.append(np.where(local >= 0, local + base, -1))
            offs[s] = batch.slots[name].offsets + flat
            base += len(uniq)
            flat += len(local)
        self.loc = np.concatenate(locs) if locs else np.empty(0, np.int64)
        self.offs = offs
        width = learner.dim_max
        self.W = np.empty((base, width), dtype=np.float32)
        self.S1 = np.zeros((base, width), dtype=np.float32)
        self.S2 = np.zeros((base, width), dtype=np.float32)
        start = 0
        for name, uniq, dim in zip(learner.slot_names, self.uniq, learner.dims, strict=True):
            stop = start + len(uniq)
            e, s1, s2 = self.sources[name].read_rows(uniq)
            self.W[start:stop, :dim] = e
            self.S1[start:stop, :dim] = s1
            self.S2[start:stop, :dim] = s2
            start = stop

    def write_back(self) -> None:
        start = 0
        for name, uniq, dim in zip(self.learner.slot_names, self.uniq, self.learner.dims,
                                   strict=True):
            stop = start + len(uniq)
            self.sources[name].write_rows(uniq, self.W[start:stop, :dim],
                                                 self.S1[start:stop, :dim],
                                                 self.S2[start:stop, :dim])
            start = stop


class OnlineLearner:
    """Owns the embedding tables, the dense model and its optimizer.

    ``micro_batch``: the deep part learns a consumed batch in consecutive slices of at most
    this many examples (the wide part learns every example before the next). ``threads`` sets
    torch's (process-wide) intra-op threads; ``None`` leaves them as the process set them.
    """

    def __init__(self, config: ModelConfig, seed: int = 0, threads: int | None = 1,
                 micro_batch: int = DEFAULT_MICRO_BATCH) -> None:
        torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(threads)
        if micro_batch < 1:
            raise ValueError("micro_batch must be >= 1")
        self.config = config
        self.micro_batch = micro_batch
        self.featurizer = Featurizer(config)
        self.tables = TableSet.from_model_config(config, seed=seed)
        self.model = CTRModel(config)
        self.optimizer = make_dense_optimizer(self.model, config)
        self.slot_names = [s.name for s in config.slots]
        self.dims = np.array([s.dim for s in config.slots], dtype=np.int64)
        self.dim_max = int(self.dims.max())
        self.width = int(self.dims.sum())
        self.starts = np.array(config.slot_starts, dtype=np.int64)
        self.fm_dim = config.fm_dim
        self.sides = np.array(config.slot_sides, dtype=np.int64)
        self.bias_lr = config.wide.bias_learning_rate
        # Learning steps that started changing state: a caller that sees this unchanged after
        # an exception knows the failed step left the model as it was.
        self.mutations = 0

    def warm_up(self) -> None:
        """Load every compiled kernel and torch's first-call paths before the first batch.

        numba compiles (or loads from its cache) on first call, ~0.5 s: without this the
        first consumed batch pays it. A throwaway learner of the same config learns one empty
        example; this learner's state and torch's random state are left as they were.
        """
        with torch.random.fork_rng():
            scratch = OnlineLearner(self.config, threads=None, micro_batch=self.micro_batch)
            scratch.step([{}], np.zeros(1), np.zeros(1))
            scratch.predict([{}])
        for table in self.tables.values():  # row creation and growth, which one example skips
            table.warm_up()

    def _optimizer_params(self) -> tuple[np.ndarray, ...]:
        """Per-slot ``(kind, lr, ftrl beta, l1, l2)`` arrays for the kernels."""
        tables = [self.tables[n] for n in self.slot_names]
        return (np.array([t.optimizer_code for t in tables], dtype=np.int64),
                np.array([t.config.learning_rate for t in tables]),
                np.array([t.config.ftrl_beta for t in tables]),
                np.array([t.config.ftrl_l1 for t in tables]),
                np.array([t.config.ftrl_l2 for t in tables]))

    def _rows(self, batch: SparseBatch, ts: np.ndarray, train: bool) -> dict[str, np.ndarray]:
        """Row per ID for every slot: counting and admitting (``train``) or read-only."""
        rows = {}
        for name in self.slot_names:
            slot = batch.slots[name]
            table = self.tables[name]
            if train:
                rows[name] = table.lookup(slot.ids, np.repeat(ts, slot.lengths))
            else:
                rows[name] = table.find(slot.ids)
        return rows

    def row_vectors(self, slot: str, ids: np.ndarray) -> np.ndarray:
        """float32 ``(len(ids), dim)``: the current embedding of each ID of ``slot`` (zeros
        for IDs without a row), as the exploration hook's user tower reads them."""
        table = self.tables[slot]
        return table.gather(table.find(ids))

    def pooled(self, batch: SparseBatch) -> np.ndarray:
        """The model input ``(batch, sum of dims)`` from the current tables (read-only)."""
        ws = _WorkingSet(self, batch, self._rows(batch, np.zeros(batch.size), train=False))
        x = np.empty((batch.size, self.width), dtype=np.float32)
        wide.pool_examples(ws.W, ws.loc, ws.offs, 0, batch.size, self.starts, self.dims, x)
        return x

    def predict_batch(self, batch: SparseBatch) -> np.ndarray:
        """p(click) for featurized examples, without learning or touching admission counts.

        The service computes exactly this from a snapshot (same pooling, same wide kernel).
        """
        x = self.pooled(batch)
        with torch.no_grad():
            deep = self.model(torch.from_numpy(x)).numpy().astype(np.float64)
        z = deep + wide.wide_logits(x, self.starts, self.fm_dim, self.sides)
        return 1.0 / (1.0 + np.exp(-z))

    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """p(click) for records, without learning or touching admission counts."""
        return self.predict_batch(self.featurizer.featurize(records))

    def step(self, records: Sequence[Mapping[str, Any]], labels: np.ndarray, ts: np.ndarray,
             learn: bool = True, logit_offset: np.ndarray | None = None) -> StepResult:
        """:meth:`step_batch` on records (mappings of ``user_id``, ``item_id``, features)."""
        return self.step_batch(self.featurizer.featurize(records), labels, ts, learn,
                               logit_offset)

    def step_batch(self, batch: SparseBatch, labels: np.ndarray, ts: np.ndarray,
                   learn: bool = True, logit_offset: np.ndarray | None = None) -> StepResult:
        """Predict every example first, then (if ``learn``) learn it.

        With ``learn``, each example is predicted before its own label (or any later one) is
        learned: the wide part has learned every earlier example, the deep part every earlier
        slice of ``micro_batch``. ``logit_offset`` is added to the logits inside the loss only
        (not to the returned predictions): the log-odds correction for down-sampled negatives.
        """
        if not learn:
            rows = self._rows(batch, np.asarray(ts, dtype=np.float64), train=False)
            return StepResult(self.predict_batch(batch), np.asarray(labels), rows, batch)
        n = batch.size
        y = np.ascontiguousarray(labels, dtype=np.float64)
        offset = (np.zeros(n) if logit_offset is None
                  else np.ascontiguousarray(logit_offset, dtype=np.float64))
        self.mutations += 1  # from here on a failure may leave the state half-applied
        rows = self._rows(batch, np.asarray(ts, dtype=np.float64), train=True)
        ws = _WorkingSet(self, batch, rows)
        probs = self._learn(ws, y, offset, -(-n // self.micro_batch))
        ws.write_back()
        return StepResult(probs, np.asarray(labels), rows, batch)

    def _learn(self, ws: _WorkingSet, y: np.ndarray, offset: np.ndarray,
               n_slices: int) -> np.ndarray:
        """Learn the working set's examples in ``n_slices`` slices of ``micro_batch``; the
        predictions made before learning. Slices past the last example step the dense part on
        no examples (:meth:`_dense_update` with ``loss=None``): a trainer rank joins every
        all-reduce of a step even when its share of the step is shorter or empty."""
        n = len(y)
        kinds, lrs, betas, l1s, l2s = self._optimizer_params()
        bias_lrs = np.full_like(lrs, self.bias_lr)
        probs = np.empty(n, dtype=np.float64)
        wide_logit = np.empty(n, dtype=np.float64)
        scratch = np.empty(self.width, dtype=np.float32)
        for i in range(n_slices):
            lo, hi = min(i * self.micro_batch, n), min((i + 1) * self.micro_batch, n)
            if lo == hi:
                self._dense_update(None, i)
                continue
            x = np.empty((hi - lo, self.width), dtype=np.float32)
            wide.pool_examples(ws.W, ws.loc, ws.offs, lo, hi, self.starts, self.dims, x)
            deep = self.model(torch.from_numpy(x))
            wide.learn_wide(ws.W, ws.S1, ws.S2, ws.loc, ws.offs, lo, hi, self.starts,
                            self.dims, kinds, lrs, bias_lrs, betas, l1s, l2s,
                            self.fm_dim, self.sides,
                            deep.detach().numpy().astype(np.float64), offset, y, probs,
                            wide_logit, scratch)
            # The deep part learns the residual of the wide part as it predicted.
            rest = torch.from_numpy((wide_logit[lo:hi] + offset[lo:hi]).astype(np.float32))
            loss = F.binary_cross_entropy_with_logits(
                deep + rest, torch.from_numpy(y[lo:hi].astype(np.float32)))
            self._dense_update(loss, i)
        return probs

    def _dense_update(self, loss: torch.Tensor | None, slice_index: int) -> None:
        """One dense optimizer step on ``loss`` (the single process never passes ``None``)."""
        clear_grads(self.optimizer)
        if loss is not None:
            loss.backward()
        dense_step(self.optimizer)
