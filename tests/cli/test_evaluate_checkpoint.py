"""cmd-fgvc evaluate reads what the checkpoint knows; errors name flags; results.json has provenance."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmd.cli import evaluate, pretrain
from cmd.cli.common import rounded
from tests.examples.test_pretrain import SMALL as PRETRAIN_SMALL

DATA = ["--synthetic_classes", "4", "--synthetic_per_class", "8", "--synthetic_image_size", "32"]


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_knn_from_checkpoint_without_architecture_flags_matches_the_monitor(run, tmp_path, capsys):
    out, result = run
    capsys.readouterr()
    res = evaluate.main(["knn", *DATA, "--nb_knn", "5", "--no_progress", "--pretrained_weights",
                         str(out / "checkpoint.pth"), "--output_dir", str(tmp_path)])
    assert res["k=5"]["top1"] == pytest.approx(result["knn"]["after"], abs=1e-3)
    printed = capsys.readouterr().out
    assert "from the checkpoint's training arguments: --arch vit_tiny --backbone_kwargs" in printed
    assert '"depth": 2' in printed and "--image_size 32" in printed and "strict" not in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    info = saved["provenance"]
    assert info["library"] == "cmd-fgvc" and info["version"] and info["date"] and info["device"] == "cpu"
    assert info["dataset"] == {"name": "synthetic", "classes": 4, "per_class": 8, "image_size": 32, "seed": 0,
                               "train": 32, "test": 32}
    assert info["checkpoint"]["path"].endswith("checkpoint.pth") and info["checkpoint"]["epoch"] == 1
    assert saved["args"]["arch"] == "vit_tiny" and saved["args"]["image_size"] == 32


def test_command_line_overrides_the_checkpoint_and_a_misfit_is_one_line(run, tmp_path):
    out, _ = run
    ckpt = str(out / "checkpoint.pth")
    args = evaluate.parse_args(["knn", *DATA, "--pretrained_weights", ckpt, "--image_size", "48"])
    evaluate.build_backbone(args)
    assert args.image_size == 48 and args.backbone_kwargs["embed_dim"] == 48  # the rest from the checkpoint
    bad = evaluate.parse_args(["knn", *DATA, "--pretrained_weights", ckpt,
                               "--backbone_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 24, "num_heads": 3}'])
    with pytest.raises(SystemExit) as stop:
        evaluate.build_backbone(bad)
    message = str(stop.value.code)
    assert "\n" not in message and "strict=False" not in message
    assert "--arch" in message and "--backbone_kwargs" in message and "shape mismatches" in message


def test_retrieval_and_load_features_describe_their_source(run, tmp_path, capsys):
    out, _ = run
    feats = tmp_path / "feats"
    common = ["--no_progress", "--pretrained_weights", str(out / "checkpoint.pth")]
    evaluate.main(["retrieval", *DATA, *common, "--output_dir", str(tmp_path / "a"), "--dump_features", str(feats)])
    info = json.loads((tmp_path / "a" / "results.json").read_text())["provenance"]
    assert info["dataset"]["queries"] + info["dataset"]["gallery"] == 64
    capsys.readouterr()
    # reloaded with the *default* (synthetic 10 x 40) data options: the record says what the features are
    evaluate.main(["knn", "--nb_knn", "5", "--load_features", str(feats), "--output_dir", str(tmp_path / "b")])
    info = json.loads((tmp_path / "b" / "results.json").read_text())["provenance"]
    assert info["features"]["loaded_from"] == str(feats.resolve())
    assert info["features"]["arch"] == "vit_tiny" and info["features"]["image_size"] == 32
    assert info["dataset"]["classes"] == 4 and info["dataset"]["train"] == 32
    assert info["features"]["checkpoint"]["epoch"] == 1
    header = capsys.readouterr().out
    assert f"features from {feats.resolve()} (vit_tiny at 32 px)" in header and "train 32, test 32" in header


def _image_folder(root, splits=("train",)):
    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (i * 40, 80, 120)).save(root / split / c / f"{i}.png")
    return root


def test_missing_test_split_says_what_to_do(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    with pytest.raises(SystemExit):  # refused before anything runs or is written
        pretrain.parse_args(["--dataset", "imagefolder", "--data_path", str(root)])
    err = capsys.readouterr().err
    assert "argument --data_path" in err and "has no test/ folder" in err and "pass --no_knn" in err
    args = pretrain.parse_args(["--dataset", "imagefolder", "--data_path", str(root), "--no_knn"])
    with pytest.raises(SystemExit, match=r"no test split.*pass --no_knn.*DATA/test/<class>/<image>") as stop:
        pretrain.build_data(args, "test", None)
    assert "split=" not in str(stop.value.code)
    assert len(pretrain.build_data(args, "train", None)) == 4
    ev = evaluate.parse_args(["knn", "--dataset", "imagefolder", "--data_path", str(root)])
    with pytest.raises(SystemExit, match=r"no test split.*lay out DATA/train/<class>/<image> and DATA/test"):
        evaluate._dataset(ev, "test", None)


def test_results_are_rounded_and_linear_table_is_legible():
    assert rounded({"a": [15.999999999999998, 1], "b": 0.0002512345678}) == {"a": [16.0, 1], "b": 0.000251235}
    table = evaluate.format_results({
        "top1": 50.0, "top5": 100.0, "lr": 0.00025, "lr_selection": "validation", "refit": True,
        "best_test_top1_over_epochs": 55.0, "feature_dim": 96, "num_train": 32, "num_val": 4,
        "per_lr": {"0.00025": {"val_top1": 50.0, "val_top5": 100.0}, "0.001": {"val_top1": 25.0, "val_top5": 75.0}},
    })
    assert "lr 0.00025 picked on a validation split of 4 training images, then retrained on all 32" in table
    assert "best_test_top1_over_epochs 55.00  (official eval_linear.py protocol: the epoch is picked on the test " \
           "split)" in table
    rows = [line.split() for line in table.splitlines() if re.match(r"\s+0\.0", line)]
    assert rows == [["0.00025", "50.00", "100.00", "<-", "picked"], ["0.001", "25.00", "75.00"]]


def test_linear_probe_results_have_a_per_lr_table(run, tmp_path, capsys):
    out, _ = run
    res = evaluate.main(["linear", *DATA, "--no_progress", "--pretrained_weights", str(out / "checkpoint.pth"),
                         "--epochs", "1", "--n_last_blocks", "1", "--lrs", "0.00025", "0.01", "--cache_features",
                         "--output_dir", str(tmp_path)])
    assert set(res["per_lr"]) == {"0.00025", "0.01"} and res["lr"] in (0.00025, 0.01)
    assert res["lr_selection"] == "validation" and res["num_val"] == 4 and res["num_train"] == 32
    printed = capsys.readouterr().out
    assert re.search(r"\n\s+0\.00025\s+\d+\.\d\d\s+\d+\.\d\d", printed), printed
    assert "best_test_top1_over_epochs" in printed and "peek" not in printed.split("best_test_top1")[0]
    assert torch.load(tmp_path / "linear_probe.pth", weights_only=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "test split" in saved["notes"]["best_test_top1_over_epochs"] and "validation" in saved["notes"]["top1"]


def test_official_protocol_is_one_lr_and_refuses_a_sweep(run, tmp_path):
    out, _ = run
    common = ["linear", *DATA, "--no_progress", "--pretrained_weights", str(out / "checkpoint.pth"), "--epochs", "1",
              "--n_last_blocks", "1", "--batch_size_per_gpu", "16", "--output_dir", str(tmp_path)]
    res = evaluate.main([*common, "--official"])
    assert res["lr_selection"] == "official" and res["lr"] == pytest.approx(1e-3 * 16 / 256)
    assert res["num_val"] == 0 and res["num_train"] == 32 and "per_lr" not in res
    for extra in (["--lr", "0.1"], ["--lrs", "0.1", "1"], ["--cache_features"]):
        with pytest.raises(SystemExit, match=f"--official sets the lr.*drop {extra[0]}"):
            evaluate.main([*common, "--official", *extra])


def test_n_last_blocks_above_the_depth_names_the_option(run, tmp_path, monkeypatch):
    """Issue 24 item 14: a depth-1 ViT failed with 'n must be an int in [1, 1] ... got 4'."""
    out, _ = run  # vit_tiny with depth 2
    monkeypatch.setattr(evaluate.cmd, "extract_features", _must_not_run)
    with pytest.raises(SystemExit, match=r"--n_last_blocks 4: the backbone \(vit_tiny\) has only 2 blocks; pass "
                                         r"--n_last_blocks 2 or fewer"):
        evaluate.main(["linear", *DATA, "--no_progress", "--pretrained_weights", str(out / "checkpoint.pth"),
                       "--epochs", "1", "--output_dir", str(tmp_path)])


def _must_not_run(*args, **kwargs):
    raise AssertionError("the evaluation ran")


def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in: read-only for a non-root user; else one of the kernel's."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        (folder / "x").touch()
    except OSError:
        return folder
    (folder / "x").unlink()
    for candidate in (Path("/proc/self"), Path("/sys/kernel")):  # root writes anywhere else
        try:
            (candidate / ".cmd_fgvc_write_test").touch()
        except OSError:
            if candidate.is_dir():
                return candidate
    pytest.skip("no unwritable folder available to this user")


@pytest.mark.parametrize("protocol", ["knn", "linear"])
@pytest.mark.parametrize("kind", ["file", "read_only", "under_a_file"])
def test_an_unusable_output_dir_is_refused_before_anything_is_computed(run, tmp_path, monkeypatch, protocol, kind):
    """Issue 24 item 19: the whole evaluation ran, then a traceback; nothing printed or saved."""
    out, _ = run
    a_file = tmp_path / "results_file"
    a_file.write_text("not a folder")
    target = {"file": a_file, "read_only": None, "under_a_file": a_file / "sub"}[kind]
    target = _unwritable_folder(tmp_path) if target is None else target
    monkeypatch.setattr(evaluate.cmd, "extract_features", _must_not_run)
    monkeypatch.setattr(evaluate.cmd.backbones, "read_checkpoint_file", _must_not_run)
    with pytest.raises(SystemExit) as stop:
        evaluate.main([protocol, *DATA, "--no_progress", "--pretrained_weights", str(out / "checkpoint.pth"),
                       "--n_last_blocks", "1", "--epochs", "1", "--output_dir", str(target)])
    message = str(stop.value.code)
    assert message.startswith(f"--output_dir {target}: ") and "\n" not in message
    assert ("is a file, not a folder" if kind == "file" else "cannot write there") in message
    assert a_file.read_text() == "not a folder"


def test_a_kept_checkpoint_is_evaluated_with_its_own_arguments(tmp_path, capsys):
    """pretrain --saveckp_freq 1 keeps checkpoint0001.pth and checkpoint0002.pth; evaluate reads either, with the
    architecture from the file, and its epoch; a missing one is named."""
    run_dir = tmp_path / "run"
    pretrain.main([*PRETRAIN_SMALL, "--epochs", "2", "--saveckp_freq", "1", "--no_knn", "--output_dir", str(run_dir)])
    assert sorted(p.name for p in run_dir.glob("checkpoint*.pth")) == [
        "checkpoint.pth", "checkpoint0001.pth", "checkpoint0002.pth"]
    first = torch.load(run_dir / "checkpoint0001.pth", weights_only=True)
    last = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert first["epoch"] == 1 and last["epoch"] == 2
    assert not torch.equal(first["teacher"]["backbone.model.cls_token"], last["teacher"]["backbone.model.cls_token"])
    results = {}
    for name in ("checkpoint0001.pth", "checkpoint0002.pth", "checkpoint.pth"):
        capsys.readouterr()
        results[name] = evaluate.main(["knn", *DATA, "--nb_knn", "5", "--no_progress", "--pretrained_weights",
                                       str(run_dir / name), "--output_dir", str(tmp_path / name)])
        assert "--arch vit_tiny" in capsys.readouterr().out
        info = json.loads((tmp_path / name / "results.json").read_text())["provenance"]["checkpoint"]
        assert info["epoch"] == (1 if name == "checkpoint0001.pth" else 2)
    assert results["checkpoint0002.pth"] == results["checkpoint.pth"]
    with pytest.raises(SystemExit):
        evaluate.main(["knn", *DATA, "--pretrained_weights", str(run_dir / "checkpoint0270.pth"),
                       "--output_dir", str(tmp_path / "missing")])
    assert "--pretrained_weights: no such file: " in capsys.readouterr().err


def test_classes_only_in_the_test_split_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "data", splits=("train", "test"))
    (root / "test" / "zz").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "zz" / "0.png")
    ev = evaluate.parse_args(["knn", "--dataset", "imagefolder", "--data_path", str(root)])
    with pytest.raises(SystemExit, match=r"\(test split\): .*zz") as stop:
        evaluate._dataset(ev, "test", None)
    assert "\n" not in str(stop.value.code)
