"""Reference numerics: EsViT's Swin and DINO's ViT reproduced within 1e-5 at 224, 96 and 112 px.

The references are written in `tests/backbones/reference_models.py` from the documented behaviour
(padding order, interpolation formula, LayerNorm eps); random weights, small models.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from cmd.backbones import create_backbone, export_checkpoint
from cmd.backbones.numerics import DINOVisionTransformer, EsViTSwinBlock, dino_position_interpolation

from .helpers import images
from .reference_models import dino_vit, esvit_swin

SIZES = (224, 96, 112)
SMALL_SWIN = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 2, 2)}
SMALL_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 3}
TOL = 1e-5


def _swin(window: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone("swin_tiny", window_size=window, **SMALL_SWIN, **kwargs).eval()


def _vit(patch: int, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_backbone("vit_tiny", patch_size=patch, **SMALL_VIT, **kwargs).eval()


def _randomise_norms(model, seed: int = 3) -> None:
    """LayerNorms with non-trivial affine parameters (timm initialises them to 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------- EsViT
@pytest.mark.parametrize("window", [7, 14])
def test_esvit_numerics_match_the_esvit_reference(window):
    bb = _swin(window, numerics="esvit")
    _randomise_norms(bb.model)
    assert bb.numerics == "esvit"
    with torch.no_grad():
        for size in SIZES:
            x = images(2, size, seed=size)
            out = bb(x)
            pooled, tokens = esvit_swin(bb.model, x, window)
            assert out.tokens.shape == tokens.shape
            assert _max_diff(out.tokens, tokens) < TOL, (window, size)
            assert _max_diff(out.pooled, pooled) < TOL, (window, size)


@pytest.mark.parametrize("window", [7, 14])
def test_timm_numerics_differ_from_esvit_at_96_px(window):
    """The test above can fail: timm's own order (shift, then pad) is far from EsViT's at 96 px."""
    bb = _swin(window)
    _randomise_norms(bb.model)
    with torch.no_grad():
        x = images(2, 96)
        _, tokens = esvit_swin(bb.model, x, window)
        assert _max_diff(bb(x).tokens, tokens) > 1e-2


def test_esvit_block_only_swaps_the_attention_step():
    bb = _swin(7)
    keys = list(bb.state_dict())
    bb.set_numerics("esvit")
    assert list(bb.state_dict()) == keys
    blocks = [m for m in bb.modules() if isinstance(m, timm.models.swin_transformer.SwinTransformerBlock)]
    assert blocks and all(type(m) is EsViTSwinBlock for m in blocks)
    assert all(m.eps == 1e-6 for m in bb.modules() if isinstance(m, torch.nn.LayerNorm))
    # the teacher is a deep copy of the student: numerics survive it
    assert copy.deepcopy(bb).numerics == "esvit"


def test_esvit_numerics_train_and_last_blocks():
    bb = _swin(7, numerics="esvit").train()
    x = images(2, 96)
    bb(x).pooled.sum().backward()
    assert all(p.grad is not None for p in bb.parameters() if p.requires_grad)
    bb.eval()
    with torch.no_grad():
        feats = bb.forward_last_blocks(x, n=1)
        assert _max_diff(feats, esvit_swin(bb.model, x, 7)[0]) < TOL


# -------------------------------------------------------------------------------------------- DINO
@pytest.mark.parametrize("patch", [16, 8])
def test_dino_numerics_match_the_dino_reference(patch):
    bb = _vit(patch, numerics="dino")
    _randomise_norms(bb.model)
    with torch.no_grad():
        bb.model.pos_embed.normal_(0, 0.5)  # pronounced embeddings, so interpolation errors show
        for size in SIZES:
            x = images(2, size, seed=size)
            out = bb(x)
            cls, tokens = dino_vit(bb.model, x)
            assert _max_diff(out.pooled, cls) < TOL, (patch, size)
            assert _max_diff(out.tokens, tokens) < TOL, (patch, size)
        # non-square crops follow the same per-axis formula
        x = images(1, 96, 160)
        assert _max_diff(bb(x).tokens, dino_vit(bb.model, x)[1]) < TOL


@pytest.mark.parametrize("patch", [16, 8])
def test_timm_numerics_differ_from_dino_at_96_px(patch):
    bb = _vit(patch)
    with torch.no_grad():
        bb.model.pos_embed.normal_(0, 0.5)
        x = images(2, 96)
        assert _max_diff(bb(x).tokens, dino_vit(bb.model, x)[1]) > 1e-2
        # ... and agree at the training size
        x = images(2, 224)
        assert _max_diff(bb(x).tokens, dino_vit(bb.model, x)[1]) < TOL


def test_dino_interpolation_is_cached_per_grid_and_passes_gradients():
    bb = _vit(16, numerics="dino")
    assert isinstance(bb.model, DINOVisionTransformer)
    bb(images(2, 96)).pooled.sum().backward()
    bb(images(2, 96, seed=2)).pooled.sum().backward()
    bb(images(2, 64))
    bb(images(2, 224))  # the training grid: no matrix
    cache = bb.model.__dict__["_dino_interp_cache"]
    assert sorted(k[0] for k in cache) == [(4, 4), (6, 6)]
    assert bb.model.pos_embed.grad is not None and bb.model.pos_embed.grad.abs().sum() > 0
    # the cached matrix is DINO's interpolation of the unit basis
    m = dino_position_interpolation((14, 14), (6, 6))
    pos = torch.randn(1, 384, 14, 14)
    direct = torch.nn.functional.interpolate(pos, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic")
    assert _max_diff(m @ pos.flatten(2)[0].t(), direct.flatten(2)[0].t()) < 1e-6
    assert copy.deepcopy(bb).numerics == "dino"


# ----------------------------------------------------------------------------------- default: timm
@pytest.mark.parametrize("family", ["swin", "vit"])
def test_default_numerics_are_timms_unchanged(family):
    """numerics=None / "timm" computes exactly what the timm model computes (bit for bit)."""
    name, kwargs = (
        ("swin_tiny_patch4_window7_224", {**SMALL_SWIN, "strict_img_size": False})
        if family == "swin"
        else ("vit_tiny_patch16_224", {**SMALL_VIT, "dynamic_img_size": True})
    )
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs).eval()
    bb = _swin(7) if family == "swin" else _vit(16)
    assert bb.numerics == "timm" and type(bb.model) is type(model)
    with torch.no_grad():
        for size in (224, 96):
            x = images(2, size)
            y = model.forward_features(x)
            tokens = y.flatten(1, 2) if family == "swin" else y[:, 1:]
            assert torch.equal(bb(x).tokens, tokens), size


def test_numerics_errors():
    with pytest.raises(ValueError, match="numerics must be one of"):
        _vit(16, numerics="esvit2")
    with pytest.raises(ValueError, match="numerics='esvit' is for timm SwinTransformer"):
        _vit(16, numerics="esvit")
    with pytest.raises(ValueError, match="numerics='dino' is for timm VisionTransformer"):
        _swin(7, numerics="dino")
    bb = _vit(16, numerics="dino")
    assert bb.set_numerics("dino") is bb
    with pytest.raises(ValueError, match="already computes 'dino'"):
        bb.set_numerics("timm")


@pytest.mark.filterwarnings("ignore:export_checkpoint.*cannot record them")
# -------------------------------------------------------------------------- chosen from checkpoints
def test_esvit_checkpoint_picks_esvit_numerics(tmp_path):
    source = _swin(14, seed=1)
    _randomise_norms(source.model)
    sd = export_checkpoint(source, layout="esvit")
    path = tmp_path / "esvit.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    bb = create_backbone("swin_tiny", window_size=14, checkpoint=path, **SMALL_SWIN).eval()
    report = bb.load_report
    assert bb.numerics == "esvit" and report.numerics == "esvit" and report.source_format == "esvit"
    assert "chosen from the checkpoint format 'esvit'" in report.summary()
    with torch.no_grad():
        for size in (224, 96):
            x = images(2, size)
            assert _max_diff(bb(x).tokens, esvit_swin(source.model, x, 14)[1]) < TOL
    # an explicit numerics wins, and the report says what the format suggests
    plain = create_backbone("swin_tiny", window_size=14, checkpoint=path, numerics="timm", **SMALL_SWIN)
    assert plain.numerics == "timm"
    assert "explicit; the checkpoint format suggests 'esvit'" in plain.load_report.summary()


def test_dino_checkpoint_picks_dino_numerics():
    source = _vit(8, seed=1)
    sd = source.model.state_dict()
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in sd.items()}, "student": {}}
    ckpt["student"] = {f"module.{k}": v for k, v in ckpt["teacher"].items()}
    bb = create_backbone("vit_tiny", patch_size=8, checkpoint=ckpt, **SMALL_VIT).eval()
    assert bb.numerics == "dino" and bb.load_report.source_format == "dino"
    with torch.no_grad():
        x = images(2, 96)
        assert _max_diff(bb(x).tokens, dino_vit(source.model, x)[1]) < TOL


def test_timm_and_cmd_checkpoints():
    source = _vit(16, seed=1)
    assert create_backbone("vit_tiny", checkpoint=source.model.state_dict(), **SMALL_VIT).numerics == "timm"
    net = {f"backbone.model.{k}": v for k, v in source.model.state_dict().items()}
    own = {"format": "cmd-fgvc", "format_version": 1, "teacher": net}
    assert create_backbone("vit_tiny", checkpoint=own, **SMALL_VIT).numerics == "timm"
    own["backbone_numerics"] = "dino"
    bb = create_backbone("vit_tiny", checkpoint=own, **SMALL_VIT)
    assert bb.numerics == "dino" and bb.load_report.suggested_numerics == "dino"


# ------------------------------------------------------------------- numerics kept or said (issue 24)
def test_export_of_esvit_numerics_records_them_or_warns(tmp_path):
    """Issue 24 item 6: a timm-layout export of a Swin with EsViT numerics reloaded with timm's, silently."""
    from cmd.backbones import load_checkpoint

    source = _swin(7, seed=1, numerics="esvit")
    _randomise_norms(source.model)
    x = images(2, 96)
    with torch.no_grad():
        expected = source(x).tokens
    # a bare state dict cannot carry the numerics: the export says so
    with pytest.warns(UserWarning, match=r"computes 'esvit' numerics.*cannot record them.*numerics='esvit'"):
        bare = export_checkpoint(source)
    assert create_backbone("swin_tiny", window_size=7, checkpoint=bare, **SMALL_SWIN).numerics == "timm"
    # a wrapped export records them, and create_backbone applies them: the same features
    export_checkpoint(source, tmp_path / "w.pth", wrap_key="teacher")
    assert torch.load(tmp_path / "w.pth", weights_only=True)["backbone_numerics"] == "esvit"
    again = create_backbone("swin_tiny", window_size=7, checkpoint=tmp_path / "w.pth", **SMALL_SWIN).eval()
    assert again.numerics == "esvit" and "stored 'backbone_numerics'" in again.load_report.summary()
    with torch.no_grad():
        assert _max_diff(again(x).tokens, expected) == 0.0
    # loading it into an existing backbone with timm's numerics warns (and keeps them)
    plain = _swin(7, seed=2)
    with pytest.warns(UserWarning, match=r"w\.pth: the stored 'backbone_numerics' entry implies 'esvit' numerics, "
                                         r"but .* computes 'timm'.*set_numerics\('esvit'\)"):
        load_checkpoint(plain, tmp_path / "w.pth")
    assert plain.numerics == "timm"
    # an EsViT-layout file (the original Swin layout implies EsViT's numerics) into a timm backbone warns too
    esvit_file = {"teacher": {f"backbone.{k}": v for k, v in export_checkpoint(source, layout="esvit").items()}}
    with pytest.warns(UserWarning, match=r"the checkpoint format 'esvit' implies 'esvit' numerics"):
        load_checkpoint(_swin(7, seed=2), esvit_file)
    import warnings

    with warnings.catch_warnings():  # and into a backbone with EsViT's numerics it is silent
        warnings.simplefilter("error")
        load_checkpoint(_swin(7, seed=2, numerics="esvit"), esvit_file)
        load_checkpoint(_swin(7, seed=2, numerics="esvit"), tmp_path / "w.pth")


def test_a_timm_vit_under_teacher_is_not_taken_for_dino(tmp_path):
    """Issue 24 item 7: {"teacher": timm state dict} got DINO numerics (0.10 token difference at 96 px)."""
    source = _vit(16, seed=1)
    path = tmp_path / "plain.pth"
    torch.save({"teacher": source.model.state_dict()}, path)
    bb = create_backbone("vit_tiny", patch_size=16, checkpoint=path, **SMALL_VIT).eval()
    assert bb.load_report.source_format == "timm" and bb.numerics == "timm"
    with torch.no_grad():
        x = images(2, 96)
        assert _max_diff(bb(x).tokens, source(x).tokens) == 0.0
    # DINO's own layout (MultiCropWrapper: backbone.* and head.*) is still DINO's, behind module. too
    dino = {"teacher": {**{f"backbone.{k}": v for k, v in source.model.state_dict().items()},
                        "head.last_layer.weight_g": torch.ones(4, 1)}}
    dino["student"] = {f"module.{k}": v for k, v in dino["teacher"].items()}
    for key in ("teacher", "student"):
        found = create_backbone("vit_tiny", patch_size=16, checkpoint=dino, checkpoint_key=key, **SMALL_VIT)
        assert found.load_report.source_format == "dino" and found.numerics == "dino"
    # a cmd network's state dict (backbone.model.*) under "teacher" is not DINO's either
    net = {"teacher": {f"backbone.model.{k}": v for k, v in source.model.state_dict().items()}}
    assert create_backbone("vit_tiny", patch_size=16, checkpoint=net, **SMALL_VIT).numerics == "timm"


@pytest.mark.parametrize("stored", ["bogus", 5, None])
def test_invalid_stored_numerics_are_refused_not_taken_for_timm(stored):
    """Issue 24 item 7: a cmd-fgvc checkpoint storing numerics 'bogus' or 5 fell back to timm silently."""
    from cmd.backbones import load_checkpoint

    source = _vit(16, seed=1)
    own = {"format": "cmd-fgvc", "format_version": 1, "backbone_numerics": stored,
           "teacher": {f"backbone.model.{k}": v for k, v in source.model.state_dict().items()}}
    with pytest.raises(ValueError, match=rf"'backbone_numerics' entry is {stored!r}, not one of .*pass numerics="):
        create_backbone("vit_tiny", patch_size=16, checkpoint=own, **SMALL_VIT)
    explicit = create_backbone("vit_tiny", patch_size=16, checkpoint=own, numerics="timm", **SMALL_VIT)
    assert explicit.numerics == "timm" and f"entry is {stored!r}" in explicit.load_report.summary()
    with pytest.warns(UserWarning, match=rf"entry is {stored!r}.*keeps the numerics it has \('timm'\)"):
        load_checkpoint(_vit(16), own)
