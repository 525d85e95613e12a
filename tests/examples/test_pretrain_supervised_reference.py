"""cmd-fgvc pretrain --supervised_reference: the same backbone trained with labels, printed beside the teacher."""

from __future__ import annotations

import json

import pytest
import torch

from cmd.cli import pretrain
from tests.examples.test_pretrain import SMALL


def test_supervised_reference_is_printed_saved_and_returned(tmp_path, capsys):
    result = pretrain.main([*SMALL, "--epochs", "1", "--output_dir", str(tmp_path), "--knn_k", "5",
                            "--supervised_reference"])
    reference = result["supervised_reference"]
    saved = json.loads((tmp_path / "supervised_reference.json").read_text())
    assert saved == pytest.approx(reference, nan_ok=True)
    # as many steps as the self-supervised run, and the teacher's k-NN numbers beside its own
    assert reference["steps"] == result["step"] == 4  # 32 images / batch 8, one epoch
    assert reference["knn_before"] == result["knn"]["before"] and reference["knn_after"] == result["knn"]["after"]
    assert 0.0 <= reference["knn_top1"] <= 100.0
    gap = reference["knn_top1"] - reference["knn_before"]
    if gap > 0:
        assert reference["gap_closed"] == pytest.approx((reference["knn_after"] - reference["knn_before"]) / gap)
    else:
        assert reference["gap_closed"] is None
    out = capsys.readouterr().out
    assert "supervised reference (the same backbone and initial weights, 4 steps with labels" in out
    # the log keeps one row per epoch (tools read its last row as the last epoch)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


def test_supervised_reference_starts_from_the_students_initial_weights(tmp_path, monkeypatch):
    seen = {}
    real = pretrain.cmd.eval.train_supervised

    def spy(backbone, *args, **kwargs):
        seen["start"] = {k: v.clone() for k, v in backbone.state_dict().items()}
        return real(backbone, *args, **kwargs)

    monkeypatch.setattr(pretrain.cmd.eval, "train_supervised", spy)
    pretrain.main([*SMALL, "--epochs", "1", "--output_dir", str(tmp_path), "--knn_k", "5",
                   "--supervised_reference", "--seed", "3"])
    torch.manual_seed(3)  # the program seeds the student's weights with --seed
    student = pretrain.build_network(pretrain.parse_args([*SMALL, "--seed", "3"]))
    for name, value in student.backbone.state_dict().items():
        assert torch.equal(seen["start"][name], value), name


def test_supervised_reference_needs_the_knn_monitor(capsys):
    with pytest.raises(SystemExit) as err:
        pretrain.parse_args([*SMALL, "--supervised_reference", "--no_knn"])
    assert err.value.code == 2
    assert "--supervised_reference" in capsys.readouterr().err


def test_supervised_reference_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain.dist, "init_distributed_from_env", lambda: None)
    monkeypatch.setattr(pretrain.dist, "is_dist", lambda: True)
    with pytest.raises(SystemExit, match="runs in one process"):
        pretrain.main([*SMALL, "--epochs", "1", "--output_dir", str(tmp_path), "--supervised_reference"])
    assert not (tmp_path / "checkpoint.pth").exists()
