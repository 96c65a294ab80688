"""The service's numpy forward pass equals the trainer's torch ``CTRModel`` (+ the wide part)
for every arch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurestore.schema import DenseConfig, load_model_config
from freshrec.settings import default_model_config_path
from service.dense import NumpyCTR
from trainer.model import CTRModel
from trainer.wide import wide_logits


@pytest.mark.parametrize("arch", ["dcn", "deepfm", "lr"])
@pytest.mark.parametrize("hidden", [(64, 32), ()])
def test_numpy_forward_equals_torch(arch: str, hidden: tuple[int, ...]) -> None:
    base = load_model_config(default_model_config_path())
    config = base.model_copy(update={"dense": DenseConfig(arch=arch, hidden=hidden)})
    torch.manual_seed(0)
    model = CTRModel(config).eval()
    with torch.no_grad():  # non-trivial biases and scale, as after training
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = np.random.default_rng(1).normal(size=(100, sum(model.slot_dims))).astype(np.float32)
    x[7] = 0.0  # an all-unknown candidate
    with torch.inference_mode():
        deep = model(torch.from_numpy(x)).numpy()
    logits = deep + wide_logits(x, model.slot_starts, model.fm_dim, model.slot_sides)
    want = 1.0 / (1.0 + np.exp(-logits))
    dense = NumpyCTR(model)
    np.testing.assert_allclose(dense.deep_logits(x), deep, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense.logits(x), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dense.predict(x), want, rtol=1e-5, atol=1e-6)
    assert dense.predict(x[:1]).shape == (1,)
