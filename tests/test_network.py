"""Tests of `cmd.network.CMDNetwork` with a tiny fake backbone (and a tiny real timm backbone)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from cmd.backbones.output import BackboneOutput
from cmd.heads import CrossLevelHead, CrossLevelOutput, DINOHead
from cmd.network import CMDNetwork

D, K, PATCH = 16, 24, 8


class PatchBackbone(nn.Module):
    """A conv patch embedding + LayerNorm; ``forward_multicrop`` batches runs of same-size crops."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, D, kernel_size=PATCH, stride=PATCH)
        self.norm = nn.LayerNorm(D)
        self.embed_dim = D

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        y = self.embed(x)
        grid = (y.shape[2], y.shape[3])
        tokens = self.norm(y.flatten(2).transpose(1, 2))
        return BackboneOutput(pooled=tokens.mean(1), tokens=tokens, grid=grid)

    def forward_multicrop(self, crops: Sequence[torch.Tensor]) -> list[BackboneOutput]:
        outs, start = [], 0
        for i in range(1, len(crops) + 1):
            if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
                outs.append(self(torch.cat(list(crops[start:i]))))
                start = i
        return outs


def _network(**head_kw) -> CMDNetwork:
    head_kw.setdefault("hidden_dim", 16)
    head_kw.setdefault("bottleneck_dim", 8)
    head_kw.setdefault("pooling_hidden_dim", 4)
    return CMDNetwork(PatchBackbone(), CrossLevelHead(D, K, **head_kw))


def _crops(b: int = 2, sizes: Sequence[int] = (32, 32, 16, 16, 16)) -> list[torch.Tensor]:
    return [torch.randn(b, 3, s, s) for s in sizes]


@pytest.mark.parametrize("image_input", ["pooled", "mil"])
def test_outputs_equal_per_crop_computation(image_input):
    net = _network(image_input=image_input)
    crops = _crops()
    outs = net(crops)
    assert len(outs) == 2 and all(isinstance(o, CrossLevelOutput) for o in outs)
    assert (outs[0].batch_size, outs[0].num_tokens) == (4, 16)
    assert (outs[1].batch_size, outs[1].num_tokens) == (6, 4)
    per_crop = []
    for crop in crops:  # each crop alone through backbone and head
        bo = net.backbone(crop)
        per_crop.append(net.head(bo.tokens, bo.pooled))
    expected = [CrossLevelOutput.cat(per_crop[:2]), CrossLevelOutput.cat(per_crop[2:])]
    for got, exp in zip(outs, expected):
        for name in ("image", "region", "tokens", "mil_weights"):
            torch.testing.assert_close(getattr(got, name), getattr(exp, name), atol=1e-5, rtol=1e-5)
    # crop-major rows: split gives back crop c
    torch.testing.assert_close(outs[1].split(3)[2].image, per_crop[4].image, atol=1e-5, rtol=1e-5)


def test_groups_follow_consecutive_sizes_and_single_tensor():
    net = _network()
    outs = net(_crops(sizes=(32, 16, 32)))
    assert [o.batch_size for o in outs] == [2, 2, 2]
    assert [o.num_tokens for o in outs] == [16, 4, 16]
    single = net(torch.randn(3, 3, 16, 16))
    assert len(single) == 1 and single[0].image.shape == (3, K)


def test_state_dict_keys_deepcopy_teacher_and_gradients():
    net = _network()
    assert {k.split(".")[0] for k in net.state_dict()} == {"backbone", "head"}
    assert net.out_dim == K and net.embed_dim == D
    teacher = copy.deepcopy(net)
    for p in teacher.parameters():
        p.requires_grad_(False)
    crops = _crops()
    s_out, t_out = net(crops[:2]), teacher(crops[:2])
    torch.testing.assert_close(s_out[0].region, t_out[0].region)
    (s_out[0].image.sum() + s_out[0].region.sum()).backward()
    assert net.backbone.embed.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_esvit_and_dino_head_keys_load():
    net = _network()
    image_src = DINOHead(D, K, hidden_dim=16, bottleneck_dim=8)
    region_src = DINOHead(D, K, hidden_dim=16, bottleneck_dim=8)
    for src in (image_src, region_src):  # distinct magnitudes so a swap would show
        with torch.no_grad():
            src.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    state = {f"backbone.{k}": v for k, v in net.backbone.state_dict().items()}
    state |= {f"head.{k}": v for k, v in image_src.legacy_state_dict().items()}
    state |= {f"head_dense.{k}": v for k, v in region_src.legacy_state_dict().items()}
    state |= {f"head.pooling.{k}": v for k, v in net.head.pooling.state_dict().items()}
    assert "head.last_layer.weight_g" in state and "head_dense.mlp.4.weight" in state
    net.load_state_dict(state, strict=True)
    x = torch.randn(3, D)
    torch.testing.assert_close(net.head.image_head(x), image_src(x))
    torch.testing.assert_close(net.head.region_head(x), region_src(x))
    # without a region head, EsViT's head_dense keys are reported, not silently dropped
    dino_net = _network(region_head=False)
    with pytest.raises(RuntimeError, match="head_dense"):
        dino_net.load_state_dict(state, strict=True)


def test_bad_inputs():
    with pytest.raises(TypeError, match="forward_multicrop"):
        CMDNetwork(nn.Linear(2, 2), CrossLevelHead(D, K))
    net = _network()
    with pytest.raises(ValueError, match="same batch"):
        net([torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)])
    with pytest.raises(ValueError, match="empty"):
        net([])
    with pytest.raises(ValueError, match=r"crops\[0\] must be a \[B, C, H, W\]"):
        net([torch.randn(3, 16, 16)])

    class Merged(PatchBackbone):  # groups every crop into one batch, whatever its size
        def forward_multicrop(self, crops):
            return [self(torch.cat([nn.functional.interpolate(c, size=16) for c in crops]))]

    bad = CMDNetwork(Merged(), net.head)
    with pytest.raises(RuntimeError, match="expected"):
        bad(_crops())


@pytest.mark.slow  # importing timm and building the model takes a few seconds
@pytest.mark.parametrize(
    ("name", "kwargs", "tokens"),
    [
        ("vit_tiny", {"depth": 1, "embed_dim": 24, "num_heads": 2}, (16, 4)),  # 64 px / 32 px, patch 16
        ("swin_tiny", {"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, (4, 1)),
    ],
)
def test_real_timm_backbone(name, kwargs, tokens):
    from cmd.backbones import create_backbone

    backbone = create_backbone(name, **kwargs).eval()
    dim = backbone.embed_dim
    net = CMDNetwork(backbone, CrossLevelHead(dim, K, hidden_dim=16, bottleneck_dim=8, pooling_hidden_dim=4))
    crops = [torch.randn(2, 3, 64, 64) for _ in range(2)] + [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        outs = net(crops)
        assert [(o.batch_size, o.num_tokens) for o in outs] == [(4, tokens[0]), (6, tokens[1])]
        assert outs[0].tokens.shape == (4, tokens[0], dim) and outs[1].region.shape == (6, tokens[1], K)
        alone = backbone(crops[3])
        expected = net.head(alone.tokens, alone.pooled)
        torch.testing.assert_close(outs[1].split(3)[1].region, expected.region, atol=1e-4, rtol=1e-4)
        teacher = copy.deepcopy(net)
        torch.testing.assert_close(teacher(crops[:2])[0].image, outs[0].image, atol=1e-5, rtol=1e-5)
