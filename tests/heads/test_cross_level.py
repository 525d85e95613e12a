"""Tests of `cmd.heads.CrossLevelHead`."""

from __future__ import annotations

import copy

import pytest
import torch

from cmd.heads import CrossLevelHead, CrossLevelOutput
from cmd.pooling import MultiInstancePooling

D, K = 12, 24


def _head(**kw) -> CrossLevelHead:
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("bottleneck_dim", 8)
    kw.setdefault("pooling_hidden_dim", 5)
    return CrossLevelHead(D, K, **kw)


@pytest.mark.parametrize("image_input", ["pooled", "mil"])
@pytest.mark.parametrize("n", [1, 9, 49])
def test_outputs_equal_per_token_computation(image_input, n):
    head = _head(image_input=image_input)
    tokens, pooled = torch.randn(3, n, D), torch.randn(3, D)
    out = head(tokens, pooled)
    assert isinstance(out, CrossLevelOutput)
    assert out.image.shape == (3, K) and out.region.shape == (3, n, K)
    assert out.mil_weights.shape == (3, n) and out.tokens is tokens
    bag, weights = head.pooling(tokens)
    torch.testing.assert_close(out.mil_weights, weights)
    expected_image = head.image_head(pooled if image_input == "pooled" else bag)
    torch.testing.assert_close(out.image, expected_image)
    for b in range(3):  # the batched region call equals the head applied token by token
        for j in range(0, n, max(1, n // 6)):
            torch.testing.assert_close(out.region[b, j], head.region_head(tokens[b, j][None])[0], atol=1e-6, rtol=1e-5)


def test_dino_preset_without_region_head_or_pooling():
    head = _head(region_head=False, pooling=None)
    assert head.region_head is None and head.pooling is None and not head.has_region_head
    out = head(torch.randn(2, 4, D), torch.randn(2, D))
    assert out.region is None and out.mil_weights is None and out.image.shape == (2, K)
    out = _head(region_head=False, pooling="mean")(torch.randn(2, 4, D), torch.randn(2, D))
    assert out.region is None and out.mil_weights.shape == (2, 4)


def test_share_prototypes():
    head = _head(share_prototypes=True)
    assert head.region_head.last_layer is head.image_head.last_layer
    assert head.region_head.mlp is not head.image_head.mlp
    n_params = sum(p.numel() for p in head.parameters())
    separate = sum(p.numel() for p in _head().parameters())
    assert separate - n_params == K * 8 + K  # one v [K, bottleneck] and one g [K, 1] fewer
    keys = set(head.state_dict())
    assert "region_head.last_layer.parametrizations.weight.original1" in keys
    teacher = copy.deepcopy(head)
    assert teacher.region_head.last_layer is teacher.image_head.last_layer
    assert teacher.image_head.last_layer is not head.image_head.last_layer
    teacher.load_state_dict(head.state_dict())
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(teacher(x, x[:, 0]).region, head(x, x[:, 0]).region)


def test_deepcopy_gives_equal_independent_teacher():
    head = _head()
    teacher = copy.deepcopy(head)
    tokens, pooled = torch.randn(2, 5, D), torch.randn(2, D)
    a, b = head(tokens, pooled), teacher(tokens, pooled)
    for name in ("image", "region", "mil_weights"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))
    for p_s, p_t in zip(head.parameters(), teacher.parameters()):
        assert p_s.data_ptr() != p_t.data_ptr()


def test_mask_goes_to_pooling():
    head = _head(image_input="mil")
    tokens = torch.randn(2, 5, D)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    out = head(tokens, mask=mask)
    assert (out.mil_weights[~mask] == 0).all()
    torch.testing.assert_close(out.image[1], head.image_head(tokens[1, 1])[None][0])
    with pytest.raises(ValueError, match="no pooling"):
        _head(pooling=None)(tokens, torch.randn(2, D), mask=mask)


def test_pooling_instance_and_gradients_reach_everything():
    pool = MultiInstancePooling(D, mode="attention", hidden_dim=4)
    head = _head(pooling=pool, image_input="mil")
    assert head.pooling is pool
    tokens = torch.randn(2, 4, D, requires_grad=True)
    out = head(tokens)
    (out.image.square().sum() + out.region.square().sum()).backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_region_dtype():
    tokens, pooled = torch.randn(2, 9, D), torch.randn(2, D)
    head = _head()
    ref = head(tokens, pooled).region
    assert ref.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ambient = head(tokens, pooled)
    assert ambient.region.dtype == torch.bfloat16  # None follows the autocast dtype
    low = copy.deepcopy(head)
    low.region_dtype = torch.bfloat16
    out = low(tokens, pooled)  # no autocast around the call
    assert out.region.dtype == torch.bfloat16 and out.image.dtype == torch.float32
    torch.testing.assert_close(out.region.float(), ref, atol=0.05, rtol=0.05)
    full = _head(region_dtype=torch.float32)
    full.load_state_dict(head.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = full(tokens.bfloat16(), pooled)
    assert out.region.dtype == torch.float32
    torch.testing.assert_close(out.region, head(tokens.bfloat16().float(), pooled).region)


def test_finite_for_huge_tokens_under_autocast():
    head = _head(image_input="mil")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(torch.randn(2, 9, D) * 1e4)
    for t in (out.image, out.region, out.mil_weights):
        assert torch.isfinite(t).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_input must be"):
        _head(image_input="cls")
    with pytest.raises(ValueError, match="pooling must be one of"):
        _head(pooling="median")
    with pytest.raises(TypeError, match="pooling must be"):
        _head(pooling=torch.nn.Identity())
    with pytest.raises(ValueError, match="pooling.dim must equal in_dim"):
        _head(pooling=MultiInstancePooling(D + 1))
    with pytest.raises(ValueError, match="needs a pooling"):
        _head(pooling=None, image_input="mil")
    with pytest.raises(ValueError, match="region_dtype"):
        _head(region_dtype=torch.int8)
    with pytest.raises(ValueError, match="share_prototypes"):
        _head(share_prototypes=True, region_head=False)
    head = _head()
    with pytest.raises(ValueError, match="needs the backbone's image vector"):
        head(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, N, D = 12\]"):
        head(torch.randn(2, 3, D + 1), torch.randn(2, D))
    with pytest.raises(ValueError, match=r"pooled must have shape \[B, D\] = \[2, 12\]"):
        head(torch.randn(2, 3, D), torch.randn(3, D))


def test_cross_level_output_renamed_fields_keep_deprecated_aliases():
    tokens, weights = torch.randn(2, 3, 4), torch.full((2, 3), 1 / 3)
    with pytest.warns(DeprecationWarning) as record:
        out = CrossLevelOutput(torch.zeros(2, 5), features=tokens, weights=weights)
    assert ["use tokens=" in str(r.message) for r in record] == [True, False]
    assert out.tokens is tokens and out.mil_weights is weights
    with pytest.warns(DeprecationWarning, match="mil_weights"):
        assert out.weights is weights
    with pytest.warns(DeprecationWarning, match="tokens"):
        assert out.features is tokens
    with pytest.raises(TypeError, match="tokens= only"):
        CrossLevelOutput(torch.zeros(2, 5), tokens=tokens, features=tokens)


def test_head_computes_only_the_outputs_asked_for():
    head = CrossLevelHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4)
    tokens = torch.randn(2, 3, 8)
    out = head(tokens, pooled=tokens.mean(1), outputs={"image"})
    assert out.region is None and out.mil_weights is None and out.region_embedding is None
    out.image.sum().backward()
    assert all(p.grad is None for p in head.pooling.parameters())  # the pooling did not run
    assert all(p.grad is None for p in head.region_head.parameters())
    with pytest.raises(ValueError, match="unknown outputs"):
        head(tokens, pooled=tokens.mean(1), outputs={"features"})
    no_pool = CrossLevelHead(8, out_dim=12, hidden_dim=16, bottleneck_dim=4, pooling=None)
    with pytest.raises(ValueError, match="no pooling"):
        no_pool(tokens, pooled=tokens.mean(1), outputs={"image", "mil_weights"})
