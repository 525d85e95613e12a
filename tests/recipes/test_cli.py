"""``cmd-fgvc pretrain --recipe / --config / --print_config`` and ``cmd-fgvc recipes``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from cmd.cli import main as cli_main
from cmd.cli.options import parse_pretrain_args

REPO = Path(__file__).resolve().parents[2]

# parse_pretrain_args([]) at a0af744, before the recipes (the demo must resolve to exactly these)
OLD_DEFAULTS = {
    "config": None, "arch": "resnet18",
    "backbone_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 8},
    "init": None, "init_key": "teacher", "init_partial": False, "out_dim": 128, "head_hidden_dim": 256,
    "head_bottleneck_dim": 64, "norm_last_layer": True, "mil_pooling": "gated_attention", "image_input": "pooled",
    "head_bn": True, "share_prototypes": False, "loss": "cmd", "image_weight": None, "region_weight": None,
    "inter_weight": None, "swapped_weight": None, "teacher_temp": 0.03, "warmup_teacher_temp": 0.03,
    "warmup_teacher_temp_epochs": 0, "student_temp": 0.1, "center_momentum": 0.9, "centering": "center",
    "koleo_weight": 0.0, "epochs": 10, "batch_size_per_gpu": 32, "lr": 0.004, "min_lr": 1e-06, "warmup_epochs": 1,
    "weight_decay": 0.04, "weight_decay_end": 0.04, "momentum_teacher": 0.99, "clip_grad": 3.0,
    "freeze_last_layer": 0, "amp": "off", "dataset": "synthetic", "data_path": None, "synthetic_classes": 10,
    "synthetic_per_class": 100, "synthetic_image_size": 32, "synthetic_difficulty": "demo",
    "synthetic_class_hue": None, "synthetic_clutter": None, "global_size": 32, "local_size": 16,
    "local_crops_number": 4, "global_crops_scale": (0.4, 1.0), "local_crops_scale": (0.05, 0.4), "eval_size": None,
    "num_workers": 2, "output_dir": "outputs/pretrain_demo", "saveckp_freq": 0, "seed": 0, "device": None,
    "knn_every": 0, "knn_k": 20, "no_knn": False, "supervised_reference": False, "log_every": 10,
    "stop_on_collapse": False, "max_steps": 0, "compile": False, "fused_region_chunk": 0, "viz": False,
    "no_progress": False, "logger": "csv",
}
NEW_KEYS = {"drop_path": 0.0, "recipe": "demo", "recipe_source": "default for --dataset synthetic"}
# the photometric augmentation became options (issue 23): before, every run used DINO's implicitly
# (jitter 0.4 0.4 0.2 0.1, blur 0.1-2 px, solarisation 0.2); the demo now sets values for its 32 px crops
PHOTOMETRIC_BEFORE = {"color_jitter": (0.4, 0.4, 0.2, 0.1), "blur_sigma": (0.1, 2.0), "solarization_prob": 0.2}
PHOTOMETRIC_DEMO = {"color_jitter": (0.4, 0.4, 0.2, 0.5), "blur_sigma": (0.015, 0.3), "solarization_prob": 0.0}


def test_demo_resolves_exactly_to_the_old_defaults():
    args = vars(parse_pretrain_args([]))
    # the old defaults also passed stem_width 16, which timm's ResNet ignores without a deep stem (no-op, dropped)
    old = {**OLD_DEFAULTS, "backbone_kwargs": {"channels": [16, 32, 64, 128], "output_stride": 8}}
    assert {k: v for k, v in args.items() if k not in NEW_KEYS and k not in PHOTOMETRIC_DEMO} == old
    assert {k: args[k] for k in PHOTOMETRIC_DEMO} == PHOTOMETRIC_DEMO
    # the library's augmentation keeps DINO's values for everyone else
    from cmd.transforms import MultiCropAugmentation

    default = MultiCropAugmentation(global_size=32, local_size=16)
    assert {k: getattr(default, k) for k in PHOTOMETRIC_BEFORE} == PHOTOMETRIC_BEFORE
    assert {k: args[k] for k in NEW_KEYS} == NEW_KEYS  # drop path 0: timm's resnet18 default, the same model
    assert vars(parse_pretrain_args(["--recipe", "demo"])) == {**args, "recipe_source": "--recipe"}


def test_the_dropped_stem_width_changed_nothing():
    import timm

    kwargs = {"channels": [16, 32, 64, 128], "output_stride": 8}
    torch.manual_seed(0)
    with_stem = timm.create_model("resnet18", pretrained=False, stem_width=16, **kwargs).state_dict()
    torch.manual_seed(0)
    without = timm.create_model("resnet18", pretrained=False, **kwargs).state_dict()
    assert with_stem.keys() == without.keys() and with_stem["conv1.weight"].shape[:2] == (64, 3)
    assert all(torch.equal(with_stem[k], without[k]) for k in with_stem)


def _print_config(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        parse_pretrain_args([*argv, "--print_config"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["demo", "paper", "released", "paper-cars", "released-cars"])
def test_print_config_round_trips_through_config(tmp_path, capsys, recipe):
    init = tmp_path / "w14.pth"
    init.write_bytes(b"")
    (tmp_path / "cub").mkdir()
    argv = ["--recipe", recipe, "--epochs", "7", "--output_dir", str(tmp_path / "out")]
    if recipe != "demo":
        argv += ["--dataset", "cub", "--data_path", str(tmp_path / "cub"), "--init", str(init)]
    text = _print_config(argv, capsys)
    assert not (tmp_path / "out").exists()  # nothing written, nothing trained
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert all(re.fullmatch(r"\w+: .+  # (flag|default|recipe [\w-]+|--recipe|default for .+)", ln) for ln in lines), text
    assert "epochs: 7  # flag" in lines and f"lr: {'0.004' if recipe == 'demo' else '0.0005'}  # recipe " in text
    assert f"recipe: {recipe}  # --recipe" in lines
    cfg = tmp_path / "resolved.yaml"
    cfg.write_text(text)
    direct = vars(parse_pretrain_args(argv))
    again = vars(parse_pretrain_args(["--config", str(cfg)]))
    assert again == {**direct, "config": str(cfg), "recipe_source": f"recipe: in {cfg}"}
    reprinted = _print_config(["--config", str(cfg)], capsys)
    assert [ln.split("  # ")[0] for ln in reprinted.splitlines()] == [ln.split("  # ")[0] for ln in text.splitlines()]
    assert f"arch: {direct['arch']}  # file {cfg}" in reprinted


def test_precedence_recipe_then_file_then_flags_and_sources(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("recipe: paper\nlr: 1.0e-3\nepochs: 50\n")
    (tmp_path / "cub").mkdir()
    argv = ["--config", str(cfg), "--epochs", "20", "--dataset", "cub", "--data_path", str(tmp_path / "cub")]
    args = parse_pretrain_args(argv)
    assert (args.recipe, args.lr, args.epochs, args.out_dim) == ("paper", 1e-3, 20, 65536)
    text = _print_config(argv, capsys)
    assert f"lr: 0.001  # file {cfg}" in text and "epochs: 20  # flag" in text
    assert "out_dim: 65536  # recipe paper" in text and "seed: 0  # default" in text


@pytest.mark.parametrize(("dataset", "recipe"), [("synthetic", "demo"), ("cub", "paper"), ("aircraft", "paper"),
                                                 ("imagefolder", "paper"), ("cars", "paper-cars")])
def test_recipe_without_recipe_flag_follows_the_dataset(tmp_path, dataset, recipe):
    (tmp_path / "test").mkdir()
    argv = [] if dataset == "synthetic" else ["--dataset", dataset, "--data_path", str(tmp_path)]
    args = parse_pretrain_args(argv)
    assert (args.recipe, args.recipe_source) == (recipe, f"default for --dataset {dataset}")
    assert args.output_dir == f"outputs/pretrain_{recipe}"


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        parse_pretrain_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_released_requires_init(tmp_path, capsys):
    err = _error(capsys, ["--recipe", "released", "--dataset", "cub", "--data_path", str(tmp_path)])
    assert "argument --init: --recipe released starts from EsViT's ImageNet Swin-T window-14 checkpoint" in err


def test_a_run_has_one_recipe(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("recipe: paper\n")
    err = _error(capsys, ["--config", str(cfg), "--recipe", "demo"])
    assert "--recipe: demo conflicts with 'recipe: paper'" in err and str(cfg) in err
    assert "argument --recipe: invalid choice: 'papr'" in _error(capsys, ["--recipe", "papr"])


def test_another_arch_does_not_inherit_the_recipes_backbone_kwargs(capsys):
    assert parse_pretrain_args(["--arch", "vit_tiny"]).backbone_kwargs == {}
    text = _print_config(["--arch", "vit_tiny"], capsys)
    assert "backbone_kwargs: {}  # default for --arch vit_tiny (the recipe's are for resnet18)" in text


def test_recipes_command_lists_every_recipe(capsys):
    assert cli_main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "paper", "released", "paper-cars", "released-cars"):
        assert re.search(rf"^{name}\s+\S", out, re.M), out
    assert cli_main(["recipes", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| option |")
    assert cli_main(["recipes", "bogus"]) == 2


def test_recipe_is_named_in_the_first_line_args_json_and_checkpoint(tmp_path, capsys):
    from cmd.cli import pretrain
    from tests.examples.test_pretrain import SMALL

    pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--max_steps", "1", "--output_dir", str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "recipe: demo (default for --dataset synthetic)"
    history = json.loads((tmp_path / "args.json").read_text())
    runs = history if isinstance(history, list) else history.get("runs", [history])
    assert json.dumps(runs).count('"recipe": "demo"') >= 1
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["recipe"] == "demo" and ckpt["args"]["drop_path"] == 0.0
