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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.featurize import Featurizer, SparseBatch
from featurestore.pooling import segment_ids
from featurestore.schema import ModelConfig
from featurestore.table import TableSet
from trainer.model import CTRModel, make_dense_optimizer


@dataclass(frozen=True)
class StepResult:
    """What one step predicted (before learning) and the rows it touched."""

    probs: np.ndarray  # predictions made before the update
    labels: np.ndarray
    rows: dict[str, np.ndarray]  # slot -> row per ID (-1 = not admitted)
    batch: SparseBatch


class OnlineLearner:
    """Owns the embedding tables, the dense model and its optimizer."""

    def __init__(self, config: ModelConfig, seed: int = 0, threads: int | None = None) -> None:
        torch.manual_seed(seed)
        if threads:
            torch.set_num_threads(threads)
        self.config = config
        self.featurizer = Featurizer(config)
        self.tables = TableSet.from_model_config(config, seed=seed)
        self.model = CTRModel(config)
        self.optimizer = make_dense_optimizer(self.model, config)
        self.slot_names = [s.name for s in config.slots]

    def _pooled(self, batch: SparseBatch, ts: np.ndarray, train: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, np.ndarray]]:
        """``(B, sum dims)`` inputs, the leaf tensors of looked-up vectors, and the rows."""
        parts, leaves, rows_by_slot = [], [], {}
        for name in self.slot_names:
            slot = batch.slots[name]
            table = self.tables[name]
            if train:
                per_id_ts = np.repeat(ts, slot.lengths)
                rows = table.lookup(slot.ids, per_id_ts)
            else:
                rows = table.find(slot.ids)
            rows_by_slot[name] = rows
            vectors = torch.from_numpy(table.gather(rows))
            vectors.requires_grad_(train)
            leaves.append(vectors)
            seg = torch.from_numpy(segment_ids(slot.offsets))
            pooled = torch.zeros(batch.size, table.config.dim).index_add(0, seg, vectors)
            lengths = torch.from_numpy(np.maximum(slot.lengths, 1).astype(np.float32))
            parts.append(pooled / lengths[:, None])
        return torch.cat(parts, dim=1), leaves, rows_by_slot

    def predict(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """p(click) for records, without learning or touching admission counts."""
        batch = self.featurizer.featurize(records)
        with torch.no_grad():
            x, _, _ = self._pooled(batch, np.zeros(batch.size), train=False)
            return torch.sigmoid(self.model(x)).numpy().astype(np.float64)

    def step(self, records: Sequence[Mapping[str, Any]], labels: np.ndarray, ts: np.ndarray,
             learn: bool = True, logit_offset: np.ndarray | None = None) -> StepResult:
        """Predict every record first, then (if ``learn``) update tables and dense weights.

        ``logit_offset`` is added to the logits inside the loss only (not to the returned
        predictions): the log-odds correction for down-sampled negatives.
        """
        batch = self.featurizer.featurize(records)
        labels_t = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        x, leaves, rows = self._pooled(batch, np.asarray(ts, dtype=np.float64), train=learn)
        logits = self.model(x)
        probs = torch.sigmoid(logits.detach()).numpy().astype(np.float64)
        if learn:
            train_logits = logits
            if logit_offset is not None:
                train_logits = logits + torch.from_numpy(np.asarray(logit_offset,
                                                                    dtype=np.float32))
            loss = F.binary_cross_entropy_with_logits(train_logits, labels_t)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            scale = float(batch.size)  # per-example gradients for the sparse rows
            for name, leaf in zip(self.slot_names, leaves, strict=True):
                if leaf.grad is not None and len(rows[name]):
                    self.tables[name].apply_gradients(rows[name], leaf.grad.numpy() * scale)
        return StepResult(probs, np.asarray(labels), rows, batch)
