"""dense_step: the direct fused-Adam call leaves weights and state exactly as Adam.step would."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from featurestore.schema import load_model_config
from freshrec.settings import default_model_config_path
from trainer.model import CTRModel, dense_step, make_dense_optimizer

CONFIG = load_model_config(default_model_config_path())


def _train(step, steps: int = 5) -> tuple[CTRModel, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = CTRModel(CONFIG)
    optimizer = make_dense_optimizer(model, CONFIG)
    gen = torch.Generator().manual_seed(7)
    width = sum(s.dim for s in CONFIG.slots)
    for _ in range(steps):
        x = torch.randn(64, width, generator=gen)
        y = (torch.rand(64, generator=gen) > 0.5).float()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step(optimizer)
    return model, optimizer


def test_dense_step_equals_adam_step_bit_for_bit() -> None:
    ref_model, ref_opt = _train(lambda o: o.step())
    model, opt = _train(dense_step)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    ref_state, state = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert ref_state.keys() == state.keys()
    for pid, entries in ref_state.items():
        for key, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[pid][key])), key
    assert int(state[0]["step"]) == 5


def test_dense_step_falls_back_to_the_optimizer_when_it_cannot_fuse() -> None:
    model = CTRModel(CONFIG)
    config = copy.deepcopy(CONFIG)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    width = sum(s.dim for s in config.slots)
    F.binary_cross_entropy_with_logits(model(torch.ones(4, width)), torch.ones(4)).backward()
    dense_step(optimizer)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
