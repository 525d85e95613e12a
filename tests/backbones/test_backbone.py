"""Backbone outputs: shapes for every family and crop size, definitions of pooled/tokens, bad input."""

from __future__ import annotations

import pytest
import torch

from cmd.backbones import ALIASES, Backbone, BackboneOutput, create_backbone, resolve_model_name

from .helpers import images, tiny


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


SIZES = [(224, 224), (96, 96), (160, 160), (192, 192), (224, 160)]
# expected final grids: ViT/16 -> size / 16; Swin-T layout and ResNet -> ceil(size / 32)
GRIDS = {
    "vit": [(14, 14), (6, 6), (10, 10), (12, 12), (14, 10)],
    "swin": [(7, 7), (3, 3), (5, 5), (6, 6), (7, 5)],
    "cnn": [(7, 7), (3, 3), (5, 5), (6, 6), (7, 5)],
}


@pytest.fixture(scope="module")
def models() -> dict[str, Backbone]:
    return {f: tiny(f) for f in ("vit", "swin", "cnn")}


@pytest.mark.parametrize("family", ["vit", "swin", "cnn"])
def test_shapes_for_every_crop_size(models, family):
    bb = models[family]
    assert bb.family == family
    for (h, w), grid in zip(SIZES, GRIDS[family]):
        out = bb(images(1, h, w))
        assert isinstance(out, BackboneOutput)
        n = grid[0] * grid[1]
        assert out.grid == grid, (family, h, w)
        assert out.tokens.shape == (1, n, bb.embed_dim)
        assert out.pooled.shape == (1, bb.embed_dim)
        assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize(("name", "dim"), [("swin_tiny", 768), ("vit_small", 384), ("resnet50", 2048)])
def test_full_size_models_grids(name, dim):
    # the real configurations on the meta device (shapes only): Swin-T 7x7 at 224 px, 3x3 at 96 px
    bb = create_backbone(name, device="meta").eval()
    family = bb.family
    assert bb.embed_dim == dim
    for (h, w), grid in zip(SIZES, GRIDS[family]):
        out = bb(torch.empty(2, 3, h, w, device="meta"))
        assert out.grid == grid and out.tokens.shape == (2, grid[0] * grid[1], dim), (name, h, w)
        assert out.pooled.shape == (2, dim)


def test_vit_definitions_against_timm_features(models):
    bb = models["vit"]
    x = images(2, 64, 48)
    y = bb.model.forward_features(x)  # [B, 1 + N, D] after the final norm
    out = bb(x)
    assert bb.num_prefix_tokens == 1
    assert torch.equal(out.pooled, y[:, 0])
    assert torch.equal(out.tokens, y[:, 1:])
    assert out.grid == (4, 3)


def test_vit_mean_pooling_and_registers():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", depth=1, reg_tokens=4, pooling="mean").eval()
    assert bb.num_prefix_tokens == 5
    x = images(2, 32)
    y = bb.model.forward_features(x)
    out = bb(x)
    assert out.tokens.shape == (2, 4, 192)
    assert torch.equal(out.tokens, y[:, 5:])
    expected = torch.stack([sum(y[b, 5 + j] for j in range(4)) / 4 for b in range(2)])
    torch.testing.assert_close(out.pooled, expected, rtol=1e-5, atol=1e-6)


def test_deit_distilled_drops_both_prefix_tokens():
    torch.manual_seed(0)
    bb = create_backbone("deit_tiny_distilled_patch16_224", depth=1).eval()
    assert bb.family == "vit" and bb.num_prefix_tokens == 2
    out = bb(images(1, 48, 32))
    assert out.tokens.shape == (1, 6, 192) and out.grid == (3, 2)


def test_swin_definitions(models):
    bb = models["swin"]
    x = images(2, 96)
    y = bb.model.forward_features(x)  # NHWC after the final norm
    assert y.shape == (2, 3, 3, 192)
    out = bb(x)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                assert torch.equal(out.tokens[b, i * 3 + j], y[b, i, j])
    expected = torch.stack([sum(y[b, i, j] for i in range(3) for j in range(3)) / 9 for b in range(2)])
    torch.testing.assert_close(out.pooled, expected, rtol=1e-5, atol=1e-6)


def test_cnn_definitions(models):
    bb = models["cnn"]
    x = images(2, 64, 96)
    fmap = bb.model.forward_features(x)  # NCHW
    assert fmap.shape == (2, 512, 2, 3)
    out = bb(x)
    assert out.grid == (2, 3)
    for i in range(2):
        for j in range(3):
            assert torch.equal(out.tokens[:, i * 3 + j], fmap[:, :, i, j])
    torch.testing.assert_close(out.pooled, fmap.mean(dim=(2, 3)))


def test_convnext_is_a_cnn():
    torch.manual_seed(0)
    bb = create_backbone("convnext_atto").eval()
    out = bb(images(1, 64))
    assert bb.family == "cnn" and out.grid == (2, 2) and out.tokens.shape == (1, 4, 320)


def test_swin_window14_accepts_both_crop_sizes():
    bb = tiny("swin", window_size=14)
    assert bb(images(1, 224)).grid == (7, 7)
    assert bb(images(1, 96)).grid == (3, 3)


# ------------------------------------------------------------------------------------------- multi-crop
@pytest.mark.parametrize("family", ["vit", "swin", "cnn"])
def test_multicrop_equals_per_crop_forwards(models, family):
    bb = models[family]
    b = 2
    crops = [images(b, 64, seed=s) for s in range(2)] + [images(b, 32, seed=10 + s) for s in range(3)]
    groups = bb.forward_multicrop(crops)
    assert len(groups) == 2
    assert groups[0].pooled.shape[0] == 2 * b and groups[1].tokens.shape[0] == 3 * b
    per_crop = bb.forward_multicrop(crops, per_crop=True)
    assert len(per_crop) == len(crops)
    starts = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]  # (group, index inside the group)
    for v, crop in enumerate(crops):
        ref = bb(crop)
        g, c = starts[v]
        rows = slice(c * b, (c + 1) * b)  # crop-major stacking
        torch.testing.assert_close(groups[g].pooled[rows], ref.pooled, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(groups[g].tokens[rows], ref.tokens, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(per_crop[v].tokens, ref.tokens, rtol=1e-4, atol=1e-5)
        assert per_crop[v].grid == ref.grid == groups[g].grid


def test_multicrop_groups_only_consecutive_sizes(models):
    bb = models["vit"]
    crops = [images(1, 32), images(1, 64), images(1, 64), images(1, 32)]
    assert Backbone.resolution_groups(crops) == [(0, 1), (1, 3), (3, 4)]
    outs = bb.forward_multicrop(crops)
    assert [o.grid for o in outs] == [(2, 2), (4, 4), (2, 2)]
    assert [o.batch_size for o in outs] == [1, 2, 1]


def test_multicrop_backward_reaches_parameters():
    with torch.enable_grad():
        bb = tiny("vit").train()
        outs = bb.forward_multicrop([images(2, 32), images(2, 32), images(2, 16)])
        loss = sum(o.pooled.sum() + o.tokens.sum() for o in outs)
        loss.backward()
    assert bb.model.patch_embed.proj.weight.grad is not None


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(models):
    vit, swin = models["vit"], models["swin"]
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vit(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"got \[1, 1, 32, 32\]"):
        vit(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TypeError):
        vit([1, 2, 3])
    with pytest.raises(ValueError, match="multiples of its patch size 16x16"):
        vit(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match="multiples of its patch size 4x4"):
        swin(torch.zeros(1, 3, 98, 96))
    with pytest.raises(ValueError, match="non-empty sequence"):
        vit.forward_multicrop([])
    with pytest.raises(ValueError, match="non-empty sequence"):
        vit.forward_multicrop(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"crops\[1\] has 3"):
        vit.forward_multicrop([torch.zeros(2, 3, 32, 32), torch.zeros(3, 3, 32, 32)])
    with pytest.raises(ValueError, match=r"crops\[1\]"):
        vit.forward_multicrop([torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 33, 32)])
    with pytest.raises(ValueError, match="n_crops=4"):
        Backbone.split_output(BackboneOutput(torch.zeros(6, 2), torch.zeros(6, 1, 2), (1, 1)), 4)


def test_bad_construction():
    with pytest.raises(ValueError, match="unknown backbone 'not_a_model'"):
        create_backbone("not_a_model")
    with pytest.raises(TypeError):
        resolve_model_name(3)
    with pytest.raises(ValueError, match="pooling must be"):
        tiny("vit", pooling="max")
    with pytest.raises(ValueError, match="pooling='cls' needs a ViT"):
        tiny("swin", pooling="cls")
    with pytest.raises(TypeError, match="nn.Module"):
        Backbone("vit")
    with pytest.raises(TypeError, match="unsupported model"):
        Backbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="either pretrained"):
        create_backbone("vit_tiny", pretrained=True, checkpoint={"a": torch.zeros(1)})


def test_aliases_resolve_to_timm_models():
    import timm

    assert ALIASES["swin_tiny"] == "swin_tiny_patch4_window7_224"
    assert ALIASES["vit_small"] == "vit_small_patch16_224"
    for alias, name in ALIASES.items():
        assert resolve_model_name(alias) == name and timm.is_model(name)
    assert resolve_model_name("swin_small_patch4_window7_224") == "swin_small_patch4_window7_224"
    assert tiny("swin").name == "swin_tiny_patch4_window7_224"


def test_pretrained_without_network_says_pass_checkpoint(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        create_backbone("vit_tiny", pretrained=True)
    except RuntimeError as err:
        assert "checkpoint=" in str(err) and "vit_tiny_patch16_224" in str(err)
    else:  # pragma: no cover - only where the weights sit in the local Hugging Face cache
        pytest.skip("pretrained weights are cached locally")


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_bf16_autocast_is_finite(models, family):
    x = images(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = models[family].forward_multicrop([x, x, images(2, 32)])
    for out in outs:
        assert torch.isfinite(out.tokens.float()).all() and torch.isfinite(out.pooled.float()).all()
    ref = models[family](x)
    torch.testing.assert_close(outs[0].pooled[:2].float(), ref.pooled, rtol=0.1, atol=0.1)
