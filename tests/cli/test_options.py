"""cmd-fgvc options: complete --help, range checks at parse time, --config through the same parser."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from cmd.cli import main as cli_main
from cmd.cli.options import (
    EvaluateOptions,
    PretrainOptions,
    build_evaluate_parser,
    build_pretrain_parser,
    parse_evaluate_args,
    parse_pretrain_args,
)
from cmd.recipes.schema import option_specs

PARSERS = {"pretrain": build_pretrain_parser, "evaluate": build_evaluate_parser}
SCHEMAS = {"pretrain": PretrainOptions, "evaluate": EvaluateOptions}


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"], ["evaluate", "--help"]])
def test_help_of_every_command_runs(argv, capsys):
    try:
        code = cli_main(argv)
    except SystemExit as stop:  # argparse's --help exits 0
        code = stop.code
    assert code == 0
    out = capsys.readouterr().out
    assert "usage:" in out


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_help_documents_every_option_once(command, capsys):
    parser = PARSERS[command]()
    assert cli_main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    formatter = argparse.RawDescriptionHelpFormatter(parser.prog)
    specs = option_specs(SCHEMAS[command])
    defaults = {f.name: f.default for f in dataclasses.fields(SCHEMAS[command])}
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.dest} has no help"
        shown = formatter._expand_help(action)  # raises for a stray % (the --every crash)
        assert shown.count("(default") <= 1, f"{action.dest}: {shown}"
        for flag in action.option_strings:
            assert flag in text, flag
        if action.dest in specs and specs[action.dest].in_recipe:  # the recipes' values, not a default
            assert "(demo: " in shown and "; paper: " in shown, f"{action.dest}: {shown}"
        elif action.dest in specs and defaults[action.dest] not in (None, False):
            assert "(default: " in shown, f"{action.dest} does not show its default: {shown}"


def _error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, not the whole usage
    return err


PRETRAIN_BAD = [
    (["--log_every", "0"], "--log_every", ">= 1"),
    (["--max_steps", "-1"], "--max_steps", ">= 0"),
    (["--saveckp_freq", "-1"], "--saveckp_freq", ">= 0"),
    (["--eval_size", "0"], "--eval_size", ">= 1"),
    (["--clip_grad", "-1"], "--clip_grad", ">= 0"),
    (["--freeze_last_layer", "-1"], "--freeze_last_layer", ">= 0"),
    (["--epochs", "0"], "--epochs", ">= 1"),
    (["--epochs", "1.5"], "--epochs", "integer"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu", ">= 1"),
    (["--teacher_temp", "0"], "--teacher_temp", "> 0"),
    (["--warmup_teacher_temp", "-0.04"], "--warmup_teacher_temp", "> 0"),
    (["--student_temp", "0"], "--student_temp", "> 0"),
    (["--center_momentum", "1.5"], "--center_momentum", "<= 1"),
    (["--momentum_teacher", "-0.1"], "--momentum_teacher", ">= 0"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--lr", "0"], "--lr", "> 0"),
    (["--weight_decay", "-1"], "--weight_decay", ">= 0"),
    (["--image_weight", "-1"], "--image_weight", ">= 0"),
    (["--out_dim", "1"], "--out_dim", ">= 2"),
    (["--koleo_weight", "0.1", "--batch_size_per_gpu", "1"], "--koleo_weight", "at least 2 images per process"),
    (["--knn_k", "0"], "--knn_k", ">= 1"),
    (["--synthetic_image_size", "8"], "--synthetic_image_size", ">= 16"),
    (["--global_crops_scale", "0.5", "0.4"], "--global_crops_scale", "increasing"),
    (["--local_crops_scale", "0", "0.4"], "--local_crops_scale", "> 0"),
    (["--global_crops_scale", "0.4", "1.5"], "--global_crops_scale", "<= 1"),
    (["--color_jitter", "0.4", "0.4", "0.2", "0.6"], "--color_jitter", "<= 0.5"),
    (["--color_jitter", "0.4", "0.4", "0.2"], "--color_jitter", "expected 4"),
    (["--color_jitter", "0.4", "-0.4", "0.2", "0.1"], "--color_jitter", ">= 0"),
    (["--blur_sigma", "2", "1"], "--blur_sigma", "increasing"),
    (["--blur_sigma", "0", "1"], "--blur_sigma", "> 0"),
    (["--solarization_prob", "1.2"], "--solarization_prob", "<= 1"),
    (["--synthetic_difficulty", "broad", "--synthetic_classes", "10"], "--synthetic_classes", "multiple of 4"),
    (["--norm_last_layer", "maybe"], "--norm_last_layer", "true or false"),
    (["--backbone_kwargs", "[1, 2]"], "--backbone_kwargs", "JSON object"),
    (["--backbone_kwargs", "{depth: 2}"], "--backbone_kwargs", "not valid JSON"),
    (["--device", "gpu"], "--device", "cuda"),
    (["--dataset", "bogus"], "--dataset", "invalid choice"),
    (["--dataset", "imagefolder"], "--data_path", "required"),
    (["--dataset", "cub", "--data_path", "/nonexistent/cub"], "--data_path", "no such folder"),
]


@pytest.mark.parametrize(("argv", "option", "why"), PRETRAIN_BAD, ids=[" ".join(c[0]) for c in PRETRAIN_BAD])
def test_pretrain_option_out_of_range_is_a_parser_error(capsys, argv, option, why):
    err = _error(capsys, parse_pretrain_args, argv)
    assert f"argument {option}" in err and why in err, err


EVALUATE_BAD = [
    (["knn", "--nb_knn", "10", "0"], "--nb_knn", ">= 1"),
    (["knn", "--temperature", "0"], "--temperature", "> 0"),
    (["knn", "--label_fraction", "0"], "--label_fraction", "> 0"),
    (["knn", "--label_fraction", "1.5"], "--label_fraction", "<= 1"),
    (["retrieval", "--every", "1"], "--every", ">= 2"),
    (["retrieval", "--map_at", "0"], "--map_at", ">= 1"),
    (["linear", "--lrs", "0.1", "-1"], "--lrs", "> 0"),
    (["linear", "--epochs", "0"], "--epochs", ">= 1"),
    (["linear", "--n_last_blocks", "0"], "--n_last_blocks", ">= 1"),
    (["linear", "--num_labels", "1"], "--num_labels", ">= 2"),
    (["knn", "--image_size", "0"], "--image_size", ">= 1"),
    (["knn", "--batch_size_per_gpu", "0"], "--batch_size_per_gpu", ">= 1"),
    (["knn", "--pretrained_weights", "/nonexistent.pth"], "--pretrained_weights", "no such file"),
    (["knn", "--load_features", "/nonexistent"], "--load_features", "no such folder"),
]


@pytest.mark.parametrize(("argv", "option", "why"), EVALUATE_BAD, ids=[" ".join(c[0]) for c in EVALUATE_BAD])
def test_evaluate_option_out_of_range_is_a_parser_error(capsys, argv, option, why):
    err = _error(capsys, parse_evaluate_args, argv)
    assert f"argument {option}" in err and why in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
@pytest.mark.parametrize("parse", [parse_pretrain_args, lambda a: parse_evaluate_args(["knn", *a])])
def test_device_cuda_without_gpu_says_so(capsys, parse):
    err = _error(capsys, parse, ["--device", "cuda"])
    assert "argument --device" in err and "no CUDA GPU" in err


def test_defaults_parse():
    args = parse_pretrain_args([])
    assert args.global_crops_scale == (0.4, 1.0) and args.backbone_kwargs["output_stride"] == 8
    assert (args.recipe, args.recipe_source) == ("demo", "default for --dataset synthetic")
    ev = parse_evaluate_args(["knn"])
    assert ev.arch is None and ev.backbone_kwargs is None and ev.image_size is None  # filled from a checkpoint


# ---------------------------------------------------------------------------------------------- --config


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_for_both_commands_and_command_line_wins(tmp_path):
    cfg = _write(tmp_path, "run.yaml", "epochs: 7\nout_dim: 128\nloss: esvit\nglobal_crops_scale: [0.3, 0.9]\n"
                 "no_knn: true\nbackbone_kwargs: {depth: 2}\nlr: 1e-3\n")
    args = parse_pretrain_args(["--config", cfg, "--out_dim", "256"])
    assert (args.epochs, args.out_dim, args.loss, args.no_knn) == (7, 256, "esvit", True)
    assert args.global_crops_scale == (0.3, 0.9) and args.backbone_kwargs == {"depth": 2} and args.lr == 1e-3
    ev = _write(tmp_path, "eval.json", json.dumps({"nb_knn": [1, 5], "temperature": 0.1, "arch": "vit_small"}))
    # a list-valued option from the file does not swallow the positional protocol
    args = parse_evaluate_args(["knn", "--config", ev, "--temperature", "0.2"])
    assert (args.protocol, args.nb_knn, args.temperature, args.arch) == ("knn", [1, 5], 0.2, "vit_small")
    args = parse_evaluate_args(["--config", ev, "retrieval"])
    assert args.protocol == "retrieval" and args.nb_knn == [1, 5]
    assert parse_pretrain_args(["--config", _write(tmp_path, "empty.yaml", "")]).epochs == 10


BAD_CONFIGS = [
    ("list.yaml", "- epochs\n- 3\n", "expected a mapping"),
    ("unknown.json", json.dumps({"epochz": 3}), "unknown option(s): epochz (did you mean epochs?)"),
    ("null.yaml", "seed: null\n", "seed: null is not allowed"),
    ("flag.yaml", 'no_knn: "false"\n', "no_knn: expected true or false"),
    ("scale.yaml", "global_crops_scale: 0.5\n", "argument --global_crops_scale: expected 2 values"),
    ("float.yaml", "epochs: 1.5\n", "argument --epochs: expected an integer"),
    ("zero.yaml", "epochs: 0\n", "argument --epochs: must be >= 1"),
    ("choice.yaml", "dataset: bogus\n", "argument --dataset: invalid choice"),
    ("temp.yaml", "teacher_temp: -1\n", "argument --teacher_temp: must be > 0"),
    ("listvalue.yaml", "epochs: [1, 2]\n", "argument --epochs: expected an integer, got [1, 2]"),
    ("badrecipe.yaml", "recipe: papr\n", "recipe: unknown recipe 'papr' (did you mean paper?)"),
    ("drop.yaml", "backbone_kwargs: {drop_path_rate: 0.1}\n", "argument --backbone_kwargs: holds drop_path_rate"),
    ("broken.json", "{epochs: 3", "not valid JSON/YAML"),
    ("broken.yaml", "epochs: [3\n", "not valid YAML"),
]


@pytest.mark.parametrize(("name", "text", "why"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_file(tmp_path, capsys, name, text, why):
    path = _write(tmp_path, name, text)
    err = _error(capsys, parse_pretrain_args, ["--config", path])
    assert why in err and path in err, err


def test_config_positional_and_missing_file(tmp_path, capsys):
    path = _write(tmp_path, "p.yaml", "protocol: knn\n")
    err = _error(capsys, parse_evaluate_args, ["knn", "--config", path])
    assert "protocol (give it on the command line)" in err
    err = _error(capsys, parse_evaluate_args, ["knn", "--config", str(tmp_path / "nope.yaml")])
    assert "no such file" in err


@pytest.mark.parametrize("script", ["pretrain.py", "evaluate.py"])
def test_example_wrappers_help(script):
    """``python examples/evaluate.py --help`` crashed on a '%' in a help text (issue 16)."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / script
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config" in proc.stdout and "--seed" in proc.stdout


# ------------------------------------------------------------------- issue 24: items 5, 12, 13, 18


def test_tilde_in_a_config_or_a_flag_is_expanded(tmp_path, monkeypatch):
    """``output_dir: ~/x`` made a literal ./~/x folder (issue 24, item 5)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data" / "test").mkdir(parents=True)
    cfg = _write(tmp_path, "run.yaml", "output_dir: ~/x\ndata_path: ~/data\ndataset: imagefolder\n")
    args = parse_pretrain_args(["--config", cfg, "--init=~/w.pth"])
    assert args.output_dir == str(tmp_path / "x") and args.data_path == str(tmp_path / "data")
    assert args.init == str(tmp_path / "w.pth")
    ev = parse_evaluate_args(["knn", "--output_dir=~/e", "--dump_features", "~/f"])
    assert (ev.output_dir, ev.dump_features) == (str(tmp_path / "e"), str(tmp_path / "f"))


def test_non_utf8_config_names_the_file(tmp_path, capsys):
    """A non-UTF-8 file gave a UnicodeDecodeError traceback without the file's name (issue 24, item 12)."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 3  # caf\xe9\n".encode("latin-1"))
    for parse in (parse_pretrain_args, lambda a: parse_evaluate_args(["knn", *a])):
        err = _error(capsys, parse, ["--config", str(path)])
        assert str(path) in err and "not UTF-8" in err, err


@pytest.mark.parametrize("where", ["flag", "file"])
def test_koleo_with_one_image_per_process_is_refused_at_parse_time(tmp_path, capsys, where):
    """It failed at step 1, after args.json was written, without naming the option (issue 24, item 13)."""
    argv = ["--koleo_weight", "0.1", "--batch_size_per_gpu", "1"]
    if where == "file":
        argv = ["--config", _write(tmp_path, "k.yaml", "koleo_weight: 0.1\nbatch_size_per_gpu: 1\n")]
    err = _error(capsys, parse_pretrain_args, argv)
    assert "argument --koleo_weight" in err and "--batch_size_per_gpu 1" in err, err
    assert parse_pretrain_args(["--koleo_weight", "0.1", "--batch_size_per_gpu", "2"]).koleo_weight == 0.1


def test_unknown_arch_is_one_line(capsys):
    """``pretrain --arch bogus`` printed a 24-line traceback (issue 24, item 18)."""
    err = _error(capsys, parse_pretrain_args, ["--arch", "bogus"])
    assert "argument --arch" in err and "unknown backbone 'bogus'" in err, err


def test_unknown_arch_through_the_command_exits_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["pretrain", "--arch", "bogus", "--output_dir", "/nonexistent/never-written"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown backbone 'bogus'" in err, err


def test_null_only_where_the_option_takes_null(tmp_path, capsys):
    cfg = _write(tmp_path, "n.yaml", "device: null\nimage_weight: null\namp: off\n")
    args = parse_pretrain_args(["--config", cfg])
    assert args.device is None and args.image_weight is None and args.amp == "off"
    err = _error(capsys, parse_pretrain_args, ["--config", _write(tmp_path, "lr.yaml", "lr: null\n")])
    assert "lr: null is not allowed (the recipe sets it" in err, err
