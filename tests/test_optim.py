"""Optimiser helpers: DINO's parameter groups, per-iteration schedules, gradient clipping vs loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cmd.optim import WEIGHT_DECAY_KEY, clip_gradients, param_groups, set_schedules


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)
        self.gamma = nn.Parameter(torch.ones(4))  # 1-D, no bias suffix
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).mean(dim=(2, 3))) * self.gamma)


def test_param_groups_follow_dino_rule():
    model = Net()
    groups = param_groups(model, weight_decay=0.04)
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in by_name["decay"]["params"])
    not_decayed = sorted(names[id(p)] for p in by_name["no_decay"]["params"])
    # the rule written out: no decay on "*.bias" and parameters with <= 1 dimension; frozen ones left out
    want_decay = sorted(
        n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".bias") and p.ndim > 1
    )
    want_no = sorted(
        n for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim <= 1)
    )
    assert decayed == want_decay == ["conv.weight", "fc.weight"]
    assert not_decayed == want_no == ["conv.bias", "fc.bias", "gamma", "norm.bias", "norm.weight"]
    assert by_name["decay"]["weight_decay"] == 0.04 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"][WEIGHT_DECAY_KEY] and not by_name["no_decay"][WEIGHT_DECAY_KEY]
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(nn.Linear(2, 2).requires_grad_(False))
    only_bias = param_groups(nn.LayerNorm(3), 0.1)
    assert [g["name"] for g in only_bias] == ["no_decay"]


def test_set_schedules_per_iteration_and_survives_state_dict():
    model = Net()
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=0.0)
    lr = np.linspace(1e-3, 1e-4, 5)
    wd = np.linspace(0.04, 0.4, 5)
    for it in range(5):
        set_schedules(opt, lr[it], wd[it])
        assert [g["lr"] for g in opt.param_groups] == [float(lr[it])] * 2
        assert [g["weight_decay"] for g in opt.param_groups] == [float(wd[it]), 0.0]
        assert all(type(g["lr"]) is float and type(g["weight_decay"]) is float for g in opt.param_groups)
    set_schedules(opt, 2e-3)  # weight decay unchanged
    assert [g["weight_decay"] for g in opt.param_groups] == [float(wd[4]), 0.0]
    restored = torch.optim.AdamW(param_groups(Net(), 0.04), lr=0.0)
    restored.load_state_dict(opt.state_dict())
    set_schedules(restored, 1e-3, 0.3)
    assert [g["weight_decay"] for g in restored.param_groups] == [0.3, 0.0]


def test_set_schedules_plain_groups_and_lr_scale():
    a, b, c = (nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    opt = torch.optim.SGD(
        [
            {"params": [a], "weight_decay": 0.1},
            {"params": [b], "weight_decay": 0.0},
            {"params": [c], "lr_scale": 0.5},
        ],
        lr=1.0,
    )
    set_schedules(opt, 0.2, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.2, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0, 0.0]
    with pytest.raises(ValueError, match="lr"):
        set_schedules(opt, float("nan"))
    with pytest.raises(ValueError, match="weight_decay"):
        set_schedules(opt, 0.1, -0.5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, scale=1.0):
    model.zero_grad()
    (model(torch.randn(4, 3, 6, 6)).pow(2).sum() * scale).backward()


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 3.0, 1e6])
def test_clip_per_parameter_matches_dino_loop(max_norm):
    model = Net()
    _backward(model, scale=50.0)
    before = _grads(model)
    norms = clip_gradients(model, max_norm)
    # DINO's loop: each parameter's gradient scaled by clip / (norm + 1e-6) when that is below 1
    want_norms, want = [], {}
    for name, g in before.items():
        n = math.sqrt(float((g.double() ** 2).sum()))
        want_norms.append(n)
        coef = max_norm / (n + 1e-6)
        want[name] = g * coef if coef < 1 else g
    assert norms.shape == (len(before),) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor(want_norms, dtype=torch.float32), rtol=1e-5, atol=0)
    after = _grads(model)
    for name in before:
        torch.testing.assert_close(after[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
        assert float(after[name].norm()) <= max_norm * (1 + 1e-4)


def test_clip_global_norm_and_edge_cases():
    model = Net()
    _backward(model, scale=50.0)
    before = _grads(model)
    total = clip_gradients(model, 1.0, per_parameter=False)
    want_total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in before.values()))
    assert total.ndim == 0 and float(total) == pytest.approx(want_total, rel=1e-5)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, before[name] / (want_total + 1e-6), rtol=1e-5, atol=1e-8)

    fresh = Net()
    assert clip_gradients(fresh, 3.0).numel() == 0  # no gradients yet
    assert float(clip_gradients(fresh, 3.0, per_parameter=False)) == 0.0
    _backward(fresh)
    snapshot = _grads(fresh)
    clip_gradients(fresh, float("inf"))  # measures only
    for name, g in _grads(fresh).items():
        assert torch.equal(g, snapshot[name])
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients(fresh, 0.0)
