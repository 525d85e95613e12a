"""`forward_last_blocks`: dimensions of the evaluation protocol and values against forward hooks."""

from __future__ import annotations

import pytest
import torch

from cmd.backbones import create_backbone

from .helpers import images, tiny


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _block_outputs(modules, run):
    """Outputs of ``modules`` (in call order) during ``run()``, captured with forward hooks."""
    captured = []
    handles = [m.register_forward_hook(lambda _m, _i, out: captured.append(out)) for m in modules]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return captured


def test_protocol_dimensions_of_the_full_models():
    # full-size models on the meta device: shapes without weights or arithmetic
    x = torch.empty(2, 3, 224, 224, device="meta")
    swin = create_backbone("swin_tiny", device="meta").eval()
    assert swin.forward_last_blocks(x, n=4).shape == (2, 384 + 384 + 768 + 768)  # 2304
    assert swin.forward_last_blocks(x, n=1).shape == (2, 768)
    vit = create_backbone("vit_small", device="meta").eval()
    assert vit.forward_last_blocks(x, n=4).shape == (2, 1536)
    assert vit.forward_last_blocks(x, n=4, avgpool=True).shape == (2, 1536 + 384)
    resnet = create_backbone("resnet50", device="meta").eval()
    assert resnet.forward_last_blocks(x, n=4).shape == (2, 256 + 512 + 1024 + 2048)
    assert resnet.forward_last_blocks(x, n=1).shape == (2, 2048)


@pytest.mark.parametrize("family", ["vit", "swin", "cnn"])
def test_n_equals_one_is_pooled(family):
    bb = tiny(family)
    x = images(2, 64)
    torch.testing.assert_close(bb.forward_last_blocks(x, n=1), bb(x).pooled, rtol=1e-5, atol=1e-6)


def test_swin_matches_hooked_block_outputs():
    bb = tiny("swin")  # depths (2, 2, 2, 2), dims 24, 48, 96, 192
    m = bb.model
    x = images(2, 96)
    blocks = [(s, blk) for s, stage in enumerate(m.layers) for blk in stage.blocks]
    outs = _block_outputs([blk for _, blk in blocks], lambda: m.forward_features(x))
    assert len(outs) == 8
    n = 5  # the last block of stage 2, both blocks of stages 3 and 4
    expected = []
    for (stage, _), out in list(zip(blocks, outs))[-n:]:
        y = m.norm(out) if stage == 3 else out  # [B, h, w, C]
        expected.append(
            torch.stack([y[b].reshape(-1, y.shape[-1]).sum(0) / (y.shape[1] * y.shape[2]) for b in range(2)])
        )
    expected = torch.cat(expected, dim=1)
    got = bb.forward_last_blocks(x, n=n)
    assert got.shape == (2, 48 + 96 + 96 + 192 + 192)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vit_matches_hooked_block_outputs_and_appends_avgpool():
    bb = tiny("vit", depth=4)
    m = bb.model
    x = images(2, 48)
    outs = _block_outputs(list(m.blocks), lambda: m.forward_features(x))
    cls = [m.norm(o)[:, 0] for o in outs[-3:]]
    mean_patch = m.norm(outs[-1])[:, 1:].mean(dim=1)
    got = bb.forward_last_blocks(x, n=3, avgpool=True)
    torch.testing.assert_close(got, torch.cat([*cls, mean_patch], dim=1), rtol=1e-5, atol=1e-5)
    # concatenated, not interleaved: the last 192 columns are the mean patch token
    torch.testing.assert_close(got[:, -192:], mean_patch, rtol=1e-5, atol=1e-5)


def test_cnn_matches_hooked_stage_outputs():
    bb = tiny("cnn")
    m = bb.model
    x = images(2, 64)
    outs = _block_outputs([m.layer1, m.layer2, m.layer3, m.layer4], lambda: m.forward_features(x))
    expected = torch.cat([o.mean(dim=(2, 3)) for o in outs[-3:]], dim=1)
    torch.testing.assert_close(bb.forward_last_blocks(x, n=3), expected, rtol=1e-5, atol=1e-5)
    assert bb.num_blocks == 5  # timm's feature_info: stem + 4 stages


def test_bad_arguments():
    vit, swin = tiny("vit"), tiny("swin")
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 2\]"):
        vit.forward_last_blocks(images(1, 32), n=3)
    with pytest.raises(ValueError, match="n must be"):
        vit.forward_last_blocks(images(1, 32), n=0)
    with pytest.raises(ValueError, match="avgpool=True is for ViTs"):
        swin.forward_last_blocks(images(1, 32), n=1, avgpool=True)
    with pytest.raises(ValueError, match="multiples of its patch size"):
        vit.forward_last_blocks(images(1, 33), n=1)


def test_vit_avgpool_in_dinos_interleaved_layout():
    """DINO's eval_linear.py: cat(cls[..., None], mean_patch[..., None], -1).reshape(B, -1) (n = 1 only)."""
    bb = tiny("vit", depth=3)
    x = images(2, 32)
    with torch.no_grad():
        out = bb(x)
        cls, mean = out.pooled, out.tokens.mean(dim=1)
        expected = torch.cat((cls.unsqueeze(-1), mean.unsqueeze(-1)), dim=-1).reshape(2, -1)
        got = bb.forward_last_blocks(x, n=1, avgpool=True, avgpool_layout="dino")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert torch.equal(got[:, 0::2], bb.forward_last_blocks(x, n=1))
        # without avgpool the layout changes nothing
        assert torch.equal(bb.forward_last_blocks(x, n=2, avgpool_layout="dino"), bb.forward_last_blocks(x, n=2))
    with pytest.raises(ValueError, match="only n_last_blocks=1"):
        bb.forward_last_blocks(x, n=2, avgpool=True, avgpool_layout="dino")
    with pytest.raises(ValueError, match="avgpool_layout must be"):
        bb.forward_last_blocks(x, n=1, avgpool=True, avgpool_layout="interleaved")
