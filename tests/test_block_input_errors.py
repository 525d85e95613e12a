"""Hostile inputs into the blocks give errors that name the input and the fix (issue 15 item 17)."""

from __future__ import annotations

import pytest
import torch

from cmd.backbones import create_backbone
from cmd.heads import CrossLevelHead
from cmd.network import CMDNetwork


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("vit_tiny", depth=1).eval()


def test_empty_batches_are_refused_by_name(backbone):
    with pytest.raises(ValueError, match=r"x is an empty batch \(shape \[0, 3, 32, 32\]\)"):
        backbone(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r"crops\[0\] is an empty batch"):
        backbone.forward_multicrop([torch.zeros(0, 3, 32, 32)])
    head = CrossLevelHead(backbone.embed_dim, 16)
    with pytest.raises(ValueError, match=r"tokens is empty \(shape \[0, 4, 192\]\)"):
        head(torch.zeros(0, 4, backbone.embed_dim), torch.zeros(0, backbone.embed_dim))
    with pytest.raises(ValueError, match=r"tokens is empty \(shape \[2, 0, 192\]\)"):
        head(torch.zeros(2, 0, backbone.embed_dim), torch.zeros(2, backbone.embed_dim))
    network = CMDNetwork(backbone, head)
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        network([torch.zeros(0, 3, 32, 32), torch.zeros(0, 3, 16, 16)])


def test_uint8_images_into_the_backbone_say_how_to_convert(backbone):
    with pytest.raises(TypeError, match=r"x has dtype torch\.uint8.*x\.float\(\) / 255"):
        backbone(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tokens_into_a_float32_head_outside_autocast(dtype):
    head = CrossLevelHead(8, 16)
    tokens, pooled = torch.randn(2, 4, 8), torch.randn(2, 8)
    with pytest.raises(TypeError, match=rf"tokens are {dtype} but the head's weights are torch\.float32.*autocast"):
        head(tokens.to(dtype), pooled.to(dtype))
    with pytest.raises(TypeError, match=rf"pooled are {dtype}"):
        head(tokens, pooled.to(dtype))
    if dtype == torch.bfloat16:  # under autocast (CPU: bfloat16) the same inputs are fine
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(tokens.to(dtype), pooled.to(dtype))
        assert torch.isfinite(out.image.float()).all()
