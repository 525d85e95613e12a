"""Tests of `cmd.heads.DINOHead`, its legacy key layout and `cancel_last_layer_gradients`."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch

from cmd.heads import (
    DINOHead,
    cancel_last_layer_gradients,
    legacy_to_parametrized_keys,
    parametrized_to_legacy_keys,
)

IN, K, HID, BOT = 12, 20, 16, 8


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _reference_forward(raw: dict[str, torch.Tensor], x: torch.Tensor, n_layers: int = 3) -> torch.Tensor:
    """DINO's head recomputed from raw legacy tensors with explicit loops (float64)."""
    out = torch.zeros(x.shape[0], raw["last_layer.weight_v"].shape[0], dtype=torch.float64)
    for row in range(x.shape[0]):
        h = [float(v) for v in x[row]]
        for layer in range(n_layers):
            w = raw[f"mlp.{2 * layer}.weight"].double()
            b = raw[f"mlp.{2 * layer}.bias"].double()
            h = [sum(float(w[o, i]) * h[i] for i in range(len(h))) + float(b[o]) for o in range(w.shape[0])]
            if layer < n_layers - 1:
                h = [_gelu(v) for v in h]
        norm = math.sqrt(sum(v * v for v in h))
        z = [v / norm for v in h]
        g, v = raw["last_layer.weight_g"].double(), raw["last_layer.weight_v"].double()
        for k in range(v.shape[0]):
            v_norm = math.sqrt(sum(float(c) ** 2 for c in v[k]))
            out[row, k] = float(g[k, 0]) * sum(float(v[k, i]) * z[i] for i in range(len(z))) / v_norm
    return out


def _raw_legacy_state(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dims = [(HID, IN), (HID, HID), (BOT, HID)]
    raw = {}
    for layer, (o, i) in enumerate(dims):
        raw[f"mlp.{2 * layer}.weight"] = torch.randn(o, i, generator=g) / math.sqrt(i)
        raw[f"mlp.{2 * layer}.bias"] = torch.randn(o, generator=g) * 0.1
    raw["last_layer.weight_g"] = torch.rand(K, 1, generator=g) + 0.5  # not 1: the magnitudes matter
    raw["last_layer.weight_v"] = torch.randn(K, BOT, generator=g)
    return raw


def _head(**kw) -> DINOHead:
    return DINOHead(IN, out_dim=K, hidden_dim=HID, bottleneck_dim=BOT, **kw)


def test_forward_matches_reference_on_own_weights():
    head = _head()
    x = torch.randn(4, IN)
    raw = head.legacy_state_dict()
    torch.testing.assert_close(head(x).double(), _reference_forward(raw, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_legacy_state_dict_loads(norm_last_layer):
    raw = _raw_legacy_state()
    head = _head(norm_last_layer=norm_last_layer)
    result = head.load_state_dict(raw, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(raw) == {f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {
        "last_layer.weight_g",
        "last_layer.weight_v",
    }
    x = torch.randn(3, IN)
    torch.testing.assert_close(head(x).double(), _reference_forward(raw, x), atol=1e-5, rtol=1e-4)
    # the loaded head exports the same tensors back in the legacy layout
    exported = head.legacy_state_dict()
    assert set(exported) == set(raw)
    for key, value in raw.items():
        assert torch.equal(exported[key], value), key


def test_legacy_state_dict_loads_under_a_prefix_and_plain_weight():
    raw = _raw_legacy_state()
    wrapper = torch.nn.ModuleDict({"head": _head()})
    wrapper.load_state_dict({f"head.{k}": v for k, v in raw.items()})
    x = torch.randn(2, IN)
    expected = _reference_forward(raw, x)
    torch.testing.assert_close(wrapper["head"](x).double(), expected, atol=1e-5, rtol=1e-4)
    # a head exported without weight normalisation: last_layer.weight = g * v / ||v||
    plain = {k: v for k, v in raw.items() if not k.startswith("last_layer")}
    v = raw["last_layer.weight_v"]
    plain["last_layer.weight"] = raw["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    head = _head(norm_last_layer=False)
    head.load_state_dict(plain)
    torch.testing.assert_close(head(x).double(), expected, atol=1e-5, rtol=1e-4)


def test_key_conversion_functions_are_inverse():
    sd = _head().state_dict()
    legacy = parametrized_to_legacy_keys({f"student.head.{k}": v for k, v in sd.items()})
    assert "student.head.last_layer.weight_g" in legacy and "student.head.mlp.0.weight" in legacy
    back = legacy_to_parametrized_keys(legacy)
    assert set(back) == {f"student.head.{k}" for k in sd}


def test_architecture_key_layout_and_init():
    head = _head(n_layers=3, use_bn=True)
    keys = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"} <= keys
    one = _head(n_layers=1)
    assert [type(m).__name__ for m in one.mlp] == ["Linear"] and one.mlp[0].weight.shape == (BOT, IN)
    big = DINOHead(256, out_dim=512, hidden_dim=512, bottleneck_dim=256)
    for m in big.mlp:
        if isinstance(m, torch.nn.Linear):
            assert abs(m.weight.std().item() - 0.02) < 0.002 and (m.bias == 0).all()
    g = big.last_layer.parametrizations.weight.original0
    assert (g == 1).all() and not g.requires_grad
    assert _head(norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    # the effective prototypes are unit rows when g = 1
    torch.testing.assert_close(big.prototypes.norm(dim=1), torch.ones(512))


def test_leading_dimensions_and_bad_input():
    head = _head()
    x = torch.randn(2, 5, IN)
    out = head(x)
    assert out.shape == (2, 5, K)
    torch.testing.assert_close(out[1, 3], head(x[1, 3:4])[0])
    with pytest.raises(ValueError, match="in_dim = 12"):
        head(torch.randn(2, IN + 1))
    with pytest.raises(ValueError, match="out_dim must be a positive int"):
        DINOHead(IN, out_dim=0)


def test_deepcopy_independent_and_hook_survives_original():
    head = _head()
    x = torch.randn(3, IN)
    teacher = copy.deepcopy(head)
    torch.testing.assert_close(teacher(x), head(x))
    with torch.no_grad():
        teacher.last_layer.parametrizations.weight.original1.mul_(-1)
    assert not torch.allclose(teacher(x), head(x))
    del head
    gc.collect()
    raw = _raw_legacy_state()
    teacher.load_state_dict(raw)  # the load hook belongs to the copy, not the deleted original
    torch.testing.assert_close(teacher(x).double(), _reference_forward(raw, x), atol=1e-5, rtol=1e-4)


def test_finite_under_autocast():
    head = _head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(4, IN) * 1e4)
    assert torch.isfinite(out).all()


def test_cancel_last_layer_gradients():
    head = _head(norm_last_layer=False)
    net = torch.nn.ModuleDict({"image": head, "other": torch.nn.Linear(2, 2)})

    def backward():
        net.zero_grad(set_to_none=False)
        (head(torch.randn(2, IN)).square().sum() + net["other"](torch.randn(1, 2)).sum()).backward()

    backward()
    cancel_last_layer_gradients(net, epoch=0, freeze_last_layer=1)
    grads = {n: p.grad for n, p in net.named_parameters()}
    last = {n for n in grads if "last_layer" in n}
    assert last == {
        "image.last_layer.parametrizations.weight.original0",
        "image.last_layer.parametrizations.weight.original1",
    }
    assert all(grads[n] is None for n in last)
    assert all(grads[n] is not None for n in grads if n not in last)
    for epoch, freeze in ((1, 1), (0, 0), (3, 2)):
        backward()
        cancel_last_layer_gradients(net, epoch=epoch, freeze_last_layer=freeze)
        assert all(p.grad is not None for p in net.parameters())


def test_one_layer_head_loads_dino_mlp_keys_and_ours():
    """DINO's nlayers=1 head is a bare nn.Linear (``mlp.weight``); ours is ``mlp.0.weight``: both load."""
    g = torch.Generator().manual_seed(7)
    raw = {
        "mlp.weight": torch.randn(BOT, IN, generator=g) / math.sqrt(IN),
        "mlp.bias": torch.randn(BOT, generator=g) * 0.1,
        "last_layer.weight_g": torch.rand(K, 1, generator=g) + 0.5,
        "last_layer.weight_v": torch.randn(K, BOT, generator=g),
    }
    head = _head(n_layers=1, norm_last_layer=False)
    head.load_state_dict(raw)
    x = torch.randn(3, IN)
    as_ours = {("mlp.0." + k[4:] if k.startswith("mlp.") else k): v for k, v in raw.items()}
    torch.testing.assert_close(head(x).double(), _reference_forward(as_ours, x, n_layers=1), atol=1e-5, rtol=1e-4)
    # the legacy export is DINO's layout, and our own layout loads too
    assert set(head.legacy_state_dict()) == set(raw)
    other = _head(n_layers=1, norm_last_layer=False)
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(x), head(x))
    # a three-layer head keeps refusing a bare mlp.weight
    with pytest.raises(RuntimeError, match="mlp.weight"):
        _head().load_state_dict(raw)
