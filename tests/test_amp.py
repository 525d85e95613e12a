"""Mixed precision: mode selection per device, autocast dtype, a scaled training step."""

from __future__ import annotations

import pytest
import torch

import cmd.amp as amp
from cmd.amp import MixedPrecision, mixed_precision


def test_auto_is_off_on_cpu():
    mp = mixed_precision("cpu")
    assert (mp.mode, mp.dtype, mp.enabled, mp.scaler.is_enabled()) == ("off", None, False, False)
    with mp.autocast():
        y = torch.nn.Linear(3, 3)(torch.randn(2, 3))
    assert y.dtype == torch.float32


@pytest.mark.parametrize(("bf16", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_prefers_bf16(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(amp, "bf16_supported", lambda device_type: bf16)
    monkeypatch.setattr(amp, "MixedPrecision", lambda mode, device_type: (mode, device_type))
    assert mixed_precision("cuda:0") == (want, "cuda")


@pytest.mark.parametrize(("mode", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_explicit_modes_autocast_on_cpu(mode, dtype):
    mp = mixed_precision("cpu", mode)
    assert mp.dtype is dtype and mp.scaler.is_enabled() == (mode == "fp16")
    with mp.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype is dtype


def test_device_and_mode_in_any_order():
    for call in (
        lambda: mixed_precision("cpu", "bf16"),
        lambda: mixed_precision("bf16", "cpu"),
        lambda: mixed_precision("bf16", device="cpu"),
        lambda: mixed_precision(torch.device("cpu"), mode="bf16"),
        lambda: mixed_precision(device="cpu", mode="bf16"),
    ):
        mp = call()
        assert (mp.mode, mp.device_type) == ("bf16", "cpu")
    assert mixed_precision("auto", device="cpu").mode == "off"
    assert mixed_precision("bf16").mode == "bf16"  # device: CUDA when available, else CPU


def test_bad_modes():
    with pytest.raises(ValueError, match="neither a mode"):
        mixed_precision("cpu", "fp8")
    with pytest.raises(ValueError, match="neither a mode"):
        mixed_precision("fp8")
    with pytest.raises(ValueError, match="two modes"):
        mixed_precision("bf16", mode="fp16")
    with pytest.raises(ValueError, match="two devices"):
        mixed_precision("cpu", device="cpu")
    with pytest.raises(ValueError, match="mode must be one of"):
        mixed_precision(device="cpu", mode="fp8")
    with pytest.raises(ValueError, match="mode"):
        MixedPrecision("auto", "cpu")
    with pytest.raises(ValueError, match="autocast is not available"):
        MixedPrecision("bf16", "meta")


@pytest.mark.parametrize("mode", ["off", "bf16", "fp16"])
def test_one_loop_serves_every_mode(mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = mixed_precision("cpu", mode)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    losses = []
    for _ in range(5):
        with mp.autocast():
            loss = (model(x).float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        mp.backward(loss)
        mp.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        mp.step(opt)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    if mode == "fp16":
        assert mp.scaler.state_dict()["scale"] > 0
    else:
        assert mp.scaler.state_dict() == {}
