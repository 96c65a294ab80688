"""The service's pooling equals the trainer-side rule (``featurestore.pooling.mean_pool``).

Equal up to float32 summation order: the served pCTRs are checked to 1e-5 end to end."""

from __future__ import annotations

import numpy as np

from featurestore.featurize import SlotIds
from featurestore.pooling import mean_pool
from service.scoring import pool_into
from service.snapshot import SlotVectors


def test_pool_into_equals_mean_pool_with_empty_bags_and_unknown_ids() -> None:
    rng = np.random.default_rng(0)
    store = SlotVectors.build(8, np.arange(100, 150), rng.normal(size=(50, 8)).astype(np.float32))
    lengths = np.array([0, 1, 3, 0, 2, 5, 1, 0])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(90, 160, size=int(offsets[-1]))  # some unknown -> zero rows
    for s in (SlotIds(ids, offsets), SlotIds(ids[:4], np.arange(5)),
              SlotIds(np.empty(0, np.int64), np.zeros(4, np.int64))):
        out = np.full((len(s.offsets) - 1, 8), np.nan, dtype=np.float32)
        pool_into(out, store, s)
        np.testing.assert_allclose(out, mean_pool(store.lookup(s.ids), s.offsets), rtol=1e-6,
                                   atol=1e-7)
