"""Tests of `cmd.pooling.MultiInstancePooling` against explicit-loop reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmd.pooling import POOLING_MODES, MultiInstancePooling

D = 6
H = 5


def _reference(pool: MultiInstancePooling, tokens: torch.Tensor, mask: torch.Tensor | None):
    """Straightforward float64 loops over rows, instances and dimensions."""
    b, n, d = tokens.shape
    t = tokens.double()
    keep = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    bags = torch.zeros(b, d, dtype=torch.float64)
    weights = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        kept = [j for j in range(n) if keep[i, j]]
        if pool.mode in ("mean", "sum"):
            for j in kept:
                weights[i, j] = 1.0 / len(kept)
                bags[i] += t[i, j] * (1.0 if pool.mode == "sum" else 1.0 / len(kept))
        elif pool.mode == "max":
            for k in range(d):
                best = max(kept, key=lambda j, k=k: (t[i, j, k].item(), -j))  # first winner on ties
                bags[i, k] = t[i, best, k]
                weights[i, best] += 1.0 / d
        else:
            V_w, V_b = pool.attention_V.weight.detach().double(), pool.attention_V.bias.detach().double()
            u = pool.attention_u.weight.detach().double()[0]
            scores = {}
            for j in kept:
                h = t[i, j]
                s = 0.0
                for r in range(pool.hidden_dim):
                    a = math.tanh(float(V_w[r] @ h + V_b[r]))
                    if pool.mode == "gated_attention":
                        U_w, U_b = pool.attention_U.weight.detach().double(), pool.attention_U.bias.detach().double()
                        a *= 1.0 / (1.0 + math.exp(-float(U_w[r] @ h + U_b[r])))
                    s += float(u[r]) * a
                scores[j] = s
            top = max(scores.values())
            z = sum(math.exp(s - top) for s in scores.values())
            for j in kept:
                weights[i, j] = math.exp(scores[j] - top) / z
                bags[i] += weights[i, j] * t[i, j]
    return bags, weights


def _masks(b: int, n: int) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    random_mask = torch.rand(b, n, generator=g) > 0.5
    random_mask[:, 0] |= ~random_mask.any(dim=1)  # at least one kept instance per row
    single = torch.zeros(b, n, dtype=torch.bool)
    single[torch.arange(b), torch.arange(b) % n] = True
    return {"none": None, "all": torch.ones(b, n, dtype=torch.bool), "random": random_mask, "single": single}


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("n", [1, 9, 49])
@pytest.mark.parametrize("mask_kind", ["none", "all", "random", "single"])
def test_matches_reference_and_weight_properties(mode, n, mask_kind):
    b = 3
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    tokens = torch.randn(b, n, D)
    mask = _masks(b, n)[mask_kind]
    bag, w = pool(tokens, mask)
    assert bag.shape == (b, D) and w.shape == (b, n)
    assert bag.dtype == tokens.dtype and w.dtype == torch.float32
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(b), atol=1e-6, rtol=0)
    if mask is not None:
        assert (w[~mask] == 0).all()
    ref_bag, ref_w = _reference(pool, tokens, mask)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bag.double(), ref_bag, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_masked_instances_are_exactly_ignored(mode):
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    tokens = torch.randn(2, 7, D)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    bag, w = pool(tokens, mask)
    junk = tokens.clone()
    junk[~mask] = torch.tensor([float("nan"), float("inf"), -1e30, 1e30, 0.0, 3.0])
    bag2, w2 = pool(junk, mask)
    assert torch.equal(w, w2) and torch.equal(bag, bag2)
    assert (w2[~mask] == 0).all()
    # the same as pooling the kept instances alone
    kept_bag, kept_w = pool(tokens[1:2, 3:4])
    assert torch.allclose(bag[1:2], kept_bag) and w[1, 3] == 1.0 and kept_w.item() == 1.0


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_all_masked_row_raises(mode):
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] are fully masked"):
        pool(torch.randn(3, 4, D), mask)


@pytest.mark.parametrize("mode", ["attention", "gated_attention", "mean", "max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_under_autocast_and_huge_tokens(mode, dtype):
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    with torch.no_grad():  # large attention parameters: logits far beyond half-precision range
        for p in pool.parameters():
            p.mul_(1e3)
    tokens = torch.randn(4, 49, D) * 1e4
    with torch.autocast("cpu", dtype=dtype):
        bag, w = pool(tokens)
    assert torch.isfinite(bag).all() and torch.isfinite(w).all() and w.dtype == torch.float32
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    bag_half, w_half = pool(tokens.to(dtype))  # half-precision tokens of magnitude 1e4
    assert torch.isfinite(bag_half).all() and torch.isfinite(w_half).all()
    assert bag_half.dtype == dtype
    torch.testing.assert_close(w_half.sum(1), torch.ones(4))


@pytest.mark.parametrize("mode", ["attention", "gated_attention"])
def test_gradients_reach_attention_parameters(mode):
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    tokens = torch.randn(3, 9, D, requires_grad=True)
    bag, w = pool(tokens)
    (bag.square().sum() + (w * torch.arange(9.0)).sum()).backward()
    names = {"attention_V.weight", "attention_V.bias", "attention_u.weight"}
    if mode == "gated_attention":
        names |= {"attention_U.weight", "attention_U.bias"}
    params = dict(pool.named_parameters())
    assert set(params) == names
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert tokens.grad.abs().sum() > 0


def test_parameter_free_modes_have_no_parameters():
    for mode in ("mean", "sum", "max"):
        assert list(MultiInstancePooling(D, mode=mode).parameters()) == []


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(POOLING_MODES),
    n=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    use_mask=st.booleans(),
)
def test_permutation_equivariance(mode, n, seed, use_mask):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pool = MultiInstancePooling(D, mode=mode, hidden_dim=H)
    tokens = torch.randn(2, n, D, generator=g)
    mask = None
    if use_mask:
        mask = torch.rand(2, n, generator=g) > 0.4
        mask[:, 0] = True
    perm = torch.randperm(n, generator=g)
    bag, w = pool(tokens, mask)
    bag_p, w_p = pool(tokens[:, perm], None if mask is None else mask[:, perm])
    torch.testing.assert_close(w_p, w[:, perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(bag_p, bag, atol=1e-5, rtol=1e-5)


def test_float64_tokens_give_float64_weights():
    pool = MultiInstancePooling(D, mode="gated_attention", hidden_dim=H).double()
    bag, w = pool(torch.randn(2, 5, D, dtype=torch.float64))
    assert bag.dtype == w.dtype == torch.float64


def test_dropout_only_in_training():
    pool = MultiInstancePooling(D, mode="attention", hidden_dim=64, dropout=0.5)
    tokens = torch.randn(2, 9, D)
    pool.eval()
    assert torch.equal(pool(tokens)[1], pool(tokens)[1])
    pool.train()
    assert not torch.equal(pool(tokens)[1], pool(tokens)[1])


def test_bad_inputs_raise_clear_errors():
    pool = MultiInstancePooling(D)
    with pytest.raises(ValueError, match="mode must be one of"):
        MultiInstancePooling(D, mode="median")
    with pytest.raises(ValueError, match="dim must be a positive int"):
        MultiInstancePooling(0)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        pool(torch.randn(4, D))
    with pytest.raises(ValueError, match="D = dim = 6"):
        pool(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="at least one instance"):
        pool(torch.randn(2, 0, D))
    with pytest.raises(TypeError, match="bool"):
        pool(torch.randn(2, 3, D), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, N\] = \[2, 3\]"):
        pool(torch.randn(2, 3, D), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating point"):
        pool(torch.ones(2, 3, D, dtype=torch.long))
