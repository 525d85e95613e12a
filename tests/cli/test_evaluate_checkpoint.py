"""cmd-fgvc evaluate reads what the checkpoint knows; errors name flags; results.json has provenance."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from cmd.cli import evaluate, pretrain
from cmd.cli.common import rounded

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
        "top1": 50.0, "top5": 100.0, "lr": 0.00025, "feature_dim": 96, "num_train": 32,
        "per_lr": {"0.00025": {"top1": 50.0, "top5": 100.0}, "0.001": {"top1": 25.0, "top5": 75.0}},
    })
    assert "lr 0.00025" in table and "lr 0.00" not in table.replace("lr 0.00025", "")
    rows = [line.split() for line in table.splitlines() if re.match(r"\s+0\.0", line)]
    assert rows == [["0.00025", "50.00", "100.00", "<-", "best"], ["0.001", "25.00", "75.00"]]


def test_linear_probe_results_have_a_per_lr_table(run, tmp_path, capsys):
    out, _ = run
    res = evaluate.main(["linear", *DATA, "--no_progress", "--pretrained_weights", str(out / "checkpoint.pth"),
                         "--epochs", "1", "--n_last_blocks", "1", "--lrs", "0.00025", "0.01", "--cache_features",
                         "--output_dir", str(tmp_path)])
    assert set(res["per_lr"]) == {"0.00025", "0.01"} and res["lr"] in (0.00025, 0.01)
    printed = capsys.readouterr().out
    assert re.search(r"\n\s+0\.00025\s+\d+\.\d\d\s+\d+\.\d\d", printed), printed
    assert torch.load(tmp_path / "linear_probe.pth", weights_only=True)


def test_classes_only_in_the_test_split_is_one_line(tmp_path):
    root = _image_folder(tmp_path / "data", splits=("train", "test"))
    (root / "test" / "zz").mkdir()
    Image.new("RGB", (16, 16)).save(root / "test" / "zz" / "0.png")
    ev = evaluate.parse_args(["knn", "--dataset", "imagefolder", "--data_path", str(root)])
    with pytest.raises(SystemExit, match=r"\(test split\): .*zz") as stop:
        evaluate._dataset(ev, "test", None)
    assert "\n" not in str(stop.value.code)
