"""cmd.load_pretrained: a cmd-fgvc training checkpoint in one call, no architecture options (issue 26)."""

from __future__ import annotations

import pytest
import torch

import cmd

NARROW = {"channels": [8, 16, 16, 32], "stem_width": 8, "output_stride": 8}  # not timm's resnet18 defaults


def _network(seed: int) -> cmd.CMDNetwork:
    torch.manual_seed(seed)
    backbone = cmd.create_backbone("resnet18", **NARROW)
    return cmd.CMDNetwork(backbone, cmd.CrossLevelHead(backbone.embed_dim, out_dim=16, hidden_dim=32, bottleneck_dim=8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny training checkpoint as `cmd-fgvc pretrain` writes it: both networks, the args, the numerics."""
    teacher, student = _network(0), _network(1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    cmd.save_checkpoint(path, teacher=teacher.state_dict(), student=student.state_dict(), epoch=1,
                        args={"arch": "resnet18", "backbone_kwargs": NARROW, "out_dim": 16},
                        backbone_numerics="timm")
    return path, teacher.eval(), student.eval()


def test_load_pretrained_returns_the_teacher_as_trained(checkpoint):
    path, teacher, student = checkpoint
    images = torch.randn(2, 3, 32, 32)
    backbone = cmd.load_pretrained(path)  # no arch, no channels / stem_width / output_stride
    assert isinstance(backbone, cmd.Backbone) and not backbone.training
    assert backbone.numerics == "timm" and backbone.load_report.loaded > 0
    with torch.no_grad():
        torch.testing.assert_close(backbone(images).pooled, teacher.backbone(images).pooled, rtol=0, atol=0)
        other = cmd.load_pretrained(path, key="student")
        torch.testing.assert_close(other(images).pooled, student.backbone(images).pooled, rtol=0, atol=0)
    assert not torch.equal(backbone(images).pooled, other(images).pooled)


def test_create_backbone_on_a_cmd_checkpoint_points_to_load_pretrained(checkpoint):
    path, _, _ = checkpoint
    with pytest.raises(ValueError, match=r"cmd\.load_pretrained\(path\)") as info:
        cmd.create_backbone("resnet18", checkpoint=path)  # timm's default widths: shape mismatches
    assert "channels=[8, 16, 16, 32]" in str(info.value)
    cmd.create_backbone("resnet18", checkpoint=path, **NARROW)  # with the stored options it loads


def test_load_pretrained_refuses_other_checkpoints_and_keys(checkpoint, tmp_path):
    path, teacher, _ = checkpoint
    with pytest.raises(ValueError, match="'teacher' or 'student'"):
        cmd.load_pretrained(path, key="ema")
    bare = tmp_path / "bare.pth"
    torch.save(teacher.backbone.state_dict(), bare)  # a state dict: no stored options
    with pytest.raises(ValueError, match=r"not a cmd-fgvc training checkpoint.*cmd\.create_backbone"):
        cmd.load_pretrained(bare)
    with pytest.raises(FileNotFoundError):
        cmd.load_pretrained(tmp_path / "missing.pth")
