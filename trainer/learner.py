"""One online learning step: featurize -> table lookup -> pool -> predict -> learn.

Kafka-free on purpose, so the training math is the same in the trainer process, in benchmarks
and in tests, and scale-out swaps the transport, not this module.

Sparse gradients: the loss is averaged over the batch for the dense optimizer, but each
embedding row gets its *per-example* gradient (the batch mean times the batch size), as in
Monolith's and TorchRec's sparse optimizers. Otherwise a row seen once in a batch of 2,048 would
move 2,048 times less than with a batch of one, and fresh IDs — the point of online training —
would learn nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.featurize import Featurizer, SparseBatch
from featurestore.schema import ModelConfig
from featurestore.table import TableSet
from trainer.model import CTRModel, make_dense_optimizer

# Slice size for learning a consumed batch (see OnlineLearner); measured in docs/trainer.md.
DEFAULT_MICRO_BATCH = 64


class CachedFeaturizer(Featurizer):
    """A :class:`Featurizer` that memoizes each slot's raw value -> IDs.

    Identical output; on streams where values repeat (IDs, demographics, genres) it skips the
    per-value type dispatch and xxh64 that dominate featurization. Each slot's cache is
    cleared when it exceeds ``max_entries``, bounding memory on streams of one-off IDs.
    """

    def __init__(self, config: ModelConfig, max_entries: int = 1 << 20) -> None:
        super().__init__(config)
        self.max_entries = max_entries
        self._encoders = {name: self._cached(enc) for name, enc in self._encoders.items()}

    def _cached(self, encode: Callable[[Any], list[int]]) -> Callable[[Any], list[int]]:
        cache: dict[Any, list[int]] = {}
        limit = self.max_entries

        def lookup(value: Any) -> list[int]:
            key = tuple(value) if isinstance(value, list) else (type(value), value)
            ids = cache.get(key)
            if ids is None:
                if len(cache) >= limit:
                    cache.clear()
                ids = cache[key] = encode(value)
            return ids

        return lookup


@dataclass(frozen=True)
class StepResult:
    """What one step predicted (before learning) and the rows it touched."""

    probs: np.ndarray  # predictions made before the update
    labels: np.ndarray
    rows: dict[str, np.ndarray]  # slot -> row per ID (-1 = not admitted)
    batch: SparseBatch


class OnlineLearner:
    """Owns the embedding tables, the dense model and its optimizer.

    ``micro_batch``: a consumed batch is learned in consecutive slices of at most this many
    examples, each predicted by the model updated on the slices before it. Prediction
    staleness (how many earlier labels an example's prediction has not yet seen) is then at
    most ``micro_batch`` instead of the whole consumed batch; on the time-ordered MovieLens
    stream that is worth +0.03 AUC at 64 versus 2,048 (docs/trainer.md). Featurization and
    table admission still run once per consumed batch.

    ``threads`` sets torch's (process-wide) intra-op threads; 1 by default because at
    micro-batch sizes the ops are too small to split and extra threads only contend.
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
        self.featurizer = CachedFeaturizer(config)
        self.tables = TableSet.from_model_config(config, seed=seed)
        self.model = CTRModel(config)
        self.optimizer = make_dense_optimizer(self.model, config)
        self.slot_names = [s.name for s in config.slots]
        # Learning steps that started changing state: a caller that sees this unchanged after
        # an exception knows the failed step left the model as it was.
        self.mutations = 0

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

    def _pooled(self, batch: SparseBatch, rows: Mapping[str, np.ndarray], lo: int, hi: int,
                grad: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[np.ndarray]]:
        """``(hi - lo, sum dims)`` inputs of examples ``lo:hi``, the looked-up leaf tensors
        and the rows they came from."""
        parts, leaves, slice_rows = [], [], []
        n = hi - lo
        for name in self.slot_names:
            slot = batch.slots[name]
            table = self.tables[name]
            a, b = int(slot.offsets[lo]), int(slot.offsets[hi])
            r = rows[name][a:b]
            slice_rows.append(r)
            vectors = torch.from_numpy(table.gather(r))
            vectors.requires_grad_(grad)
            leaves.append(vectors)
            lengths = slot.offsets[lo + 1:hi + 1] - slot.offsets[lo:hi]
            if b - a == n and (lengths == 1).all():  # one ID per example: no pooling needed
                parts.append(vectors)
                continue
            seg = torch.from_numpy(np.repeat(np.arange(n), lengths))
            pooled = torch.zeros(n, table.config.dim).index_add(0, seg, vectors)
            inv = torch.from_numpy(1.0 / np.maximum(lengths, 1).astype(np.float32))
            parts.append(pooled * inv[:, None])
        return torch.cat(parts, dim=1), leaves, slice_rows

    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """p(click) for records, without learning or touching admission counts."""
        batch = self.featurizer.featurize(records)
        rows = self._rows(batch, np.zeros(batch.size), train=False)
        with torch.no_grad():
            x, _, _ = self._pooled(batch, rows, 0, batch.size, grad=False)
            return torch.sigmoid(self.model(x)).numpy().astype(np.float64)

    def step(self, records: Sequence[Mapping[str, Any]], labels: np.ndarray, ts: np.ndarray,
             learn: bool = True, logit_offset: np.ndarray | None = None) -> StepResult:
        """Predict every record first, then (if ``learn``) update tables and dense weights.

        With ``learn``, the batch is learned in slices of ``micro_batch``: each example is
        predicted before its own label (or any later one) is learned, by a model that has
        learned every earlier slice. ``logit_offset`` is added to the logits inside the loss
        only (not to the returned predictions): the log-odds correction for down-sampled
        negatives.
        """
        batch = self.featurizer.featurize(records)
        labels_np = np.asarray(labels, dtype=np.float32)
        offsets_np = (None if logit_offset is None
                      else np.asarray(logit_offset, dtype=np.float32))
        if learn:
            self.mutations += 1
        rows = self._rows(batch, np.asarray(ts, dtype=np.float64), train=learn)
        probs = np.empty(batch.size, dtype=np.float64)
        step = self.micro_batch if learn else max(batch.size, 1)
        for lo in range(0, batch.size, step):
            hi = min(lo + step, batch.size)
            with torch.set_grad_enabled(learn):
                x, leaves, slice_rows = self._pooled(batch, rows, lo, hi, grad=learn)
                logits = self.model(x)
            probs[lo:hi] = torch.sigmoid(logits.detach()).numpy()
            if learn:
                self._learn(logits, labels_np[lo:hi],
                            None if offsets_np is None else offsets_np[lo:hi],
                            leaves, slice_rows)
        return StepResult(probs, np.asarray(labels), rows, batch)

    def _learn(self, logits: torch.Tensor, labels: np.ndarray, offset: np.ndarray | None,
               leaves: list[torch.Tensor], rows: list[np.ndarray]) -> None:
        if offset is not None:
            logits = logits + torch.from_numpy(offset)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        scale = float(len(labels))  # per-example gradients for the sparse rows
        for name, leaf, r in zip(self.slot_names, leaves, rows, strict=True):
            if leaf.grad is not None and len(r):
                self.tables[name].apply_gradients(r, leaf.grad.numpy() * scale)
