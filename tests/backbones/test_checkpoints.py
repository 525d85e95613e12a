"""`load_checkpoint` / `export_checkpoint`: every recognised format, round trips, every bad input."""

from __future__ import annotations

import argparse
import os
import re

import pytest
import torch
from torch import nn

from cmd.backbones import LoadReport, create_backbone, export_checkpoint, load_checkpoint

from .helpers import images, tiny


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _assert_same_features(a, b, sizes=(64, 32)):
    for s in sizes:
        x = images(2, s, seed=s)
        oa, ob = a(x), b(x)
        assert torch.equal(oa.pooled, ob.pooled) and torch.equal(oa.tokens, ob.tokens), s


class _Network(nn.Module):
    """Stands in for CMDNetwork: keys ``backbone.model.<timm key>`` and ``head.<...>``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.embed_dim, 8)


# ----------------------------------------------------------------------------------------- formats
def test_own_training_checkpoint(tmp_path):
    student, teacher = _Network(tiny("vit", seed=1)), _Network(tiny("vit", seed=2))
    ckpt = {
        "format": "cmd-fgvc",
        "format_version": 1,
        "student": student.state_dict(),
        "teacher": teacher.state_dict(),
        "epoch": 7,
        "loss": {"center": torch.zeros(8)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    fresh = tiny("vit", seed=3)
    report = load_checkpoint(fresh, path)
    assert report.source_format == "cmd-fgvc" and report.ok
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    _assert_same_features(fresh, teacher.backbone)
    load_checkpoint(fresh, path, checkpoint_key="student")
    _assert_same_features(fresh, student.backbone)


def test_own_checkpoint_with_ddp_and_compile_prefixes():
    net = _Network(tiny("vit", seed=1))
    sd = {f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}
    fresh = tiny("vit", seed=2)
    report = load_checkpoint(fresh, {"format": "cmd-fgvc", "format_version": 1, "teacher": sd, "student": sd})
    assert report.ok and report.loaded == len(fresh.model.state_dict())
    _assert_same_features(fresh, net.backbone)


@pytest.mark.filterwarnings("ignore:.*implies 'dino' numerics")  # a timm ViT on purpose
def test_dino_checkpoint_with_args_namespace(tmp_path):
    teacher, student = tiny("vit", seed=1), tiny("vit", seed=2)
    head = {"head.mlp.0.weight": torch.randn(16, 192), "head.last_layer.weight_g": torch.ones(32, 1)}
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.model.state_dict().items()}, **head},
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.model.state_dict().items()},
            **{f"module.{k}": v for k, v in head.items()},
        },
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", lr=5e-4),
        "dino_loss": {"center": torch.zeros(1, 32)},
    }
    path = tmp_path / "dino.pth"
    torch.save(ckpt, path)
    fresh = tiny("vit", seed=3)
    report = load_checkpoint(fresh, path)  # weights_only=True, Namespace allowed
    assert report.source_format == "dino" and report.ok
    assert sorted(report.dropped) == sorted(head)
    _assert_same_features(fresh, teacher)
    report = load_checkpoint(fresh, path, checkpoint_key="student")
    assert sorted(report.dropped) == sorted(f"module.{k}"[len("module.") :] for k in head)
    _assert_same_features(fresh, student)


def _original_swin_key(timm_key: str) -> str:
    """Independent statement of the layout difference: timm stage i+1's merging is stage i's in Swin."""
    m = re.match(r"layers\.(\d+)\.downsample\.(.*)", timm_key)
    return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else timm_key


@pytest.mark.filterwarnings("ignore:export_checkpoint.*cannot record them")
@pytest.mark.filterwarnings("ignore:.*implies 'esvit' numerics")  # timm numerics on purpose
@pytest.mark.parametrize(("window", "prefix"), [(7, ""), (14, "backbone.")])
def test_esvit_layout_round_trip_is_bit_exact(tmp_path, window, prefix):
    source = tiny("swin", seed=1, window_size=window)
    exported = export_checkpoint(source, layout="esvit")
    timm_sd = source.model.state_dict()
    # every timm weight is there under its original-Swin name, with the same values
    for k, v in timm_sd.items():
        assert torch.equal(exported[_original_swin_key(k)], v), k
    assert "layers.0.downsample.reduction.weight" in exported
    assert not any(k.startswith("layers.3.downsample") for k in exported)
    index = exported["layers.0.blocks.0.attn.relative_position_index"]
    assert index.shape == (window * window, window * window)
    # wrap it as EsViT saves it: a teacher with DINO heads (image head and dense region head)
    heads = {"head.mlp.0.weight": torch.randn(16, 192), "head_dense.last_layer.weight_g": torch.ones(32, 1)}
    teacher = {**{f"{prefix}{k}": v for k, v in exported.items()}, **heads}
    path = tmp_path / "esvit.pth"
    torch.save(
        {"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 3}, path
    )

    fresh = tiny("swin", seed=2, window_size=window)
    report = load_checkpoint(fresh, path)
    assert report.source_format == "esvit" and report.ok
    buffers = [f"{prefix}{k}" for k in exported if k.endswith("relative_position_index")]
    assert len(buffers) == 8
    assert sorted(report.dropped) == sorted([*heads, *(b[len(prefix) :] for b in buffers)])
    for size in (224, 96):
        x = images(1, size)
        a, b = source(x), fresh(x)
        assert torch.equal(a.pooled, b.pooled) and torch.equal(a.tokens, b.tokens), size
    report = load_checkpoint(fresh, path, checkpoint_key="student")
    assert report.ok and report.source_format == "esvit"


def test_plain_timm_state_dicts(tmp_path):
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10, dynamic_img_size=True)
    sd = classifier.state_dict()
    fresh = tiny("vit", depth=1, seed=2)
    report = load_checkpoint(fresh, sd)
    assert report.source_format == "timm" and report.ok
    assert sorted(report.dropped) == ["head.bias", "head.weight"]
    x = images(2, 32)
    torch.testing.assert_close(
        fresh(x).pooled, classifier.forward_head(classifier.forward_features(x), pre_logits=True)
    )
    # a timm training checkpoint keeps it under "state_dict"; timm's Swin classifier is head.fc.*
    swin = tiny("swin", seed=3)
    torch.save({"state_dict": swin.model.state_dict(), "epoch": 1}, tmp_path / "timm.pth")
    fresh_swin = tiny("swin", seed=4)
    assert load_checkpoint(fresh_swin, tmp_path / "timm.pth").source_format == "timm"
    _assert_same_features(fresh_swin, swin)


def test_resnet_classifier_dropped_and_backbone_state_dict_loads():
    torch.manual_seed(0)
    import timm

    classifier = timm.create_model("resnet18", layers=(1, 1, 1, 1), num_classes=5)
    fresh = tiny("cnn", seed=1)
    report = load_checkpoint(fresh, classifier.state_dict())
    assert report.ok and sorted(report.dropped) == ["fc.bias", "fc.weight"]
    other = tiny("cnn", seed=2)
    assert load_checkpoint(other, fresh.state_dict()).ok  # keys "model.<timm key>"
    _assert_same_features(other, fresh)


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    source = tiny("vit", seed=1)
    save_file(source.model.state_dict(), str(tmp_path / "model.safetensors"))
    fresh = tiny("vit", seed=2)
    assert load_checkpoint(fresh, tmp_path / "model.safetensors").ok
    _assert_same_features(fresh, source)


def test_create_backbone_with_checkpoint(tmp_path):
    source = tiny("swin", seed=1)
    export_checkpoint(source, tmp_path / "w.pth", layout="esvit", wrap_key="teacher")
    torch.manual_seed(5)
    bb = create_backbone(
        "swin_tiny", checkpoint=tmp_path / "w.pth", embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)
    )
    # the wrapped export records the source's numerics ('timm'), which win over the layout's ('esvit')
    assert bb.numerics == "timm" and "stored 'backbone_numerics'" in bb.load_report.summary()
    _assert_same_features(bb.eval(), source)


def test_export_is_atomic_and_independent(tmp_path):
    source = tiny("vit", seed=1)
    path = tmp_path / "sub" / "backbone.pth"
    sd = export_checkpoint(source, path)
    assert os.listdir(path.parent) == ["backbone.pth"]  # no temporary file left behind
    assert set(sd) == set(source.model.state_dict())
    before = sd["cls_token"].clone()
    source.model.cls_token.add_(1.0)
    assert torch.equal(sd["cls_token"], before)  # a copy, not a view of the live weights
    assert set(torch.load(path, weights_only=True)) == set(sd)
    with pytest.raises(ValueError, match="layout='esvit' is for Swin"):
        export_checkpoint(source, layout="esvit")
    with pytest.raises(ValueError, match="layout must be"):
        export_checkpoint(source, layout="dino")


# ----------------------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_checkpoint(tiny("vit"), tmp_path / "nothing.pth")


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_truncated_or_corrupted_file(tmp_path, damage):
    path = tmp_path / "broken.pth"
    torch.save({"teacher": tiny("vit").model.state_dict()}, path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        path.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())
    else:
        path.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"broken\.pth.*truncated or corrupted"):
        load_checkpoint(tiny("vit"), path)


def test_pickled_objects_need_trust_pickle(tmp_path):
    path = tmp_path / "pickled.pth"
    source = tiny("vit", seed=1)
    torch.save({"teacher": source.model.state_dict(), "extra": _Pickled()}, path)
    fresh = tiny("vit", seed=2)
    with pytest.raises(RuntimeError, match=r"pickled\.pth.*_Pickled.*trust_pickle=True"):
        load_checkpoint(fresh, path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        assert load_checkpoint(fresh, path, trust_pickle=True).ok
    _assert_same_features(fresh, source)


class _Pickled:
    pass


def test_unknown_formats(tmp_path):
    bb = tiny("vit")
    with pytest.raises(ValueError, match=r"unknown checkpoint format.*\['config', 'weights'\]"):
        load_checkpoint(bb, {"config": {"a": 1}, "weights": [1, 2]})
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: unknown checkpoint format: expected a dict, got list"):
        load_checkpoint(bb, tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"checkpoint\['teacher'\] is not a state dict"):
        load_checkpoint(bb, {"teacher": {"a": torch.zeros(1), "b": 3}})
    with pytest.raises(TypeError, match="path or a dict"):
        load_checkpoint(bb, 42)


def test_own_format_errors():
    bb = tiny("vit")
    sd = {f"backbone.model.{k}": v for k, v in bb.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_key 'ema' not in .* \['teacher', 'student'\]"):
        load_checkpoint(
            bb,
            {"format": "cmd-fgvc", "format_version": 1, "teacher": sd, "student": sd},
            checkpoint_key="ema",
        )
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        load_checkpoint(bb, {"format": "cmd-fgvc", "format_version": 2, "teacher": sd})


def test_other_architecture_raises_naming_file_key_and_shapes(tmp_path):
    path = tmp_path / "vit_wide.pth"
    torch.save({"teacher": tiny("vit", embed_dim=96, num_heads=3).model.state_dict()}, path)
    bb = tiny("vit")
    with pytest.raises(ValueError) as info:
        load_checkpoint(bb, path)
    msg = str(info.value)
    assert (
        "vit_wide.pth" in msg
        and "'teacher'" in msg
        and "cls_token: checkpoint [1, 1, 96] vs model [1, 1, 192]" in msg
    )
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    report = load_checkpoint(bb, path, strict=False)
    assert isinstance(report, LoadReport) and not report.ok
    assert any(m.startswith("cls_token:") for m in report.mismatched)
    assert torch.equal(bb.model.cls_token, before["cls_token"])  # mismatched tensors are left alone


def test_missing_and_unexpected_keys(tmp_path):
    deep, shallow = tiny("vit", depth=2), tiny("vit", depth=1)
    with pytest.raises(ValueError, match=r"unexpected keys: \['blocks\.1\."):
        load_checkpoint(shallow, deep.model.state_dict())
    with pytest.raises(ValueError, match=r"missing keys: \['blocks\.1\."):
        load_checkpoint(deep, shallow.model.state_dict())
    report = load_checkpoint(deep, shallow.model.state_dict(), strict=False)
    assert report.missing and all(k.startswith("blocks.1.") for k in report.missing)
    assert report.loaded == len(shallow.model.state_dict())


@pytest.mark.filterwarnings("ignore:export_checkpoint.*cannot record them")
@pytest.mark.filterwarnings("ignore:.*implies 'esvit' numerics")
def test_swin_window_mismatch_is_reported_not_interpolated():
    w14 = export_checkpoint(tiny("swin", window_size=14), layout="esvit")
    w7 = tiny("swin")
    with pytest.raises(ValueError, match="window size"):
        load_checkpoint(w7, w14)
    report = load_checkpoint(w7, w14, strict=False)
    assert any(
        "relative_position_bias_table: checkpoint [729, 1] vs model [169, 1]" in m for m in report.mismatched
    )
