"""examples/pretrain.py: the default run, exact resume, non-finite stop, torchrun with 2 processes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "pretrain.py"

# A few steps of the default run: tiny data, tiny crops, 2 local crops.
SMALL = [
    "--synthetic_classes", "4", "--synthetic_per_class", "8", "--synthetic_image_size", "32",
    "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--out_dim", "64",
    "--batch_size_per_gpu", "8", "--warmup_epochs", "1", "--no_progress", "--log_every", "1", "--num_workers", "0",
    "--arch", "vit_tiny", "--backbone_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}',
    "--head_bn", "false",  # per-process BatchNorm statistics would make 2 processes differ from 1
]


def _load_module():
    spec = importlib.util.spec_from_file_location("pretrain_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pretrain():
    return _load_module()


def _teacher_state(path: Path) -> dict:
    return torch.load(path / "checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]


@pytest.mark.slow
def test_default_run_reduced(pretrain, tmp_path):
    result = pretrain.main([*SMALL, "--epochs", "2", "--output_dir", str(tmp_path), "--knn_k", "5", "--viz"])
    assert not result["interrupted"]
    assert {"before", "after"} <= set(result["knn"])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for key in ("loss", "image", "region", "inter_level", "inter_level_teacher", "teacher_entropy", "lr",
                "weight_decay", "teacher_momentum", "teacher_temp", "images_per_s", "epoch_time_s"):
        assert key in log[0], key
    import cmd

    backbone = cmd.create_backbone("vit_tiny", depth=2, patch_size=8, embed_dim=48, num_heads=3)
    report = cmd.load_checkpoint(backbone, tmp_path / "checkpoint.pth", checkpoint_key="teacher")
    assert not report.missing and not report.unexpected
    assert report.suggested_numerics == "timm"  # the run's numerics, stored as "backbone_numerics"
    for picture in ("training_curves.png", "region_weights.png", "embedding.png"):
        assert (tmp_path / picture).stat().st_size > 1000, picture


@pytest.mark.slow
def test_resume_equals_uninterrupted(pretrain, tmp_path):
    common = [*SMALL, "--epochs", "2", "--no_knn"]
    pretrain.main([*common, "--output_dir", str(tmp_path / "full")])
    # the interrupted and resumed runs load data with 2 worker processes: augmentations are seeded
    # per (epoch, image), so the workers change nothing
    workers = ["--num_workers", "2"]
    first = pretrain.main([*common, *workers, "--output_dir", str(tmp_path / "resumed"), "--max_steps", "3"])
    assert first["interrupted"] and first["step"] == 3  # mid-epoch (4 steps per epoch)
    second = pretrain.main([*common, *workers, "--output_dir", str(tmp_path / "resumed")])
    assert not second["interrupted"]
    full, resumed = _teacher_state(tmp_path / "full"), _teacher_state(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_with_message(pretrain, tmp_path, monkeypatch):
    import cmd

    original = cmd.CMDLoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.terms["region"] = out.terms["region"] * float("nan")
        out.loss = out.loss + out.terms["region"]
        return out

    monkeypatch.setattr(cmd.CMDLoss, "forward", poisoned)
    with pytest.raises(pretrain.NonFiniteLossError, match=r"step 1.*region"):
        pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)])
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("extra", [[], ["--head_bn", "true"]], ids=["plain", "head_bn"])
def test_torchrun_two_processes_equals_one_process(tmp_path, extra):
    # --head_bn: runs under torch.distributed (gloo, CPU: per-process BatchNorm statistics)
    common = [*SMALL, "--epochs", "1", "--no_knn", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run(
        [sys.executable, str(SCRIPT), *common, "--output_dir", str(tmp_path / "one")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         *common, "--batch_size_per_gpu", "4", "--output_dir", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _teacher_state(tmp_path / "one"), _teacher_state(tmp_path / "two")
    if extra:  # on the CPU the BatchNorm statistics are per process (SyncBatchNorm is GPU-only): runs, not equal
        assert "BatchNorm statistics per process" in two.stdout
        assert a.keys() == b.keys() and all(torch.isfinite(v.float()).all() for v in b.values())
        return
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    la = json.loads((tmp_path / "one" / "log.jsonl").read_text().splitlines()[-1])
    lb = json.loads((tmp_path / "two" / "log.jsonl").read_text().splitlines()[-1])
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-4)


def test_config_file_sets_defaults_and_cli_overrides(pretrain, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 7\nout_dim: 128\nloss: esvit\n")
    args = pretrain.parse_args(["--config", str(cfg), "--out_dim", "256"])
    assert (args.epochs, args.out_dim, args.loss) == (7, 256, "esvit")
    cfg_json = tmp_path / "run.json"
    cfg_json.write_text(json.dumps({"epochs": 3}))
    assert pretrain.parse_args(["--config", str(cfg_json)]).epochs == 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochz": 3}))
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--config", str(bad)])


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *SMALL, "--epochs", "50", "--no_knn", "--output_dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-2000:]  # interrupted, resumable (cmd.cli.exit_status)
    assert "stopped at step" in out
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert 0 < ckpt["step"] < 50 * 4


@pytest.mark.parametrize("preset", ["dino", "esvit"])
def test_other_presets_run_and_log_strict_json(pretrain, tmp_path, preset):
    pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--loss", preset, "--output_dir", str(tmp_path)])

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    (record,) = [json.loads(line, parse_constant=reject) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "image" in record and ("region" in record) == (preset == "esvit")
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["backbone_numerics"] == "timm"  # read back by create_backbone(checkpoint=...)


@pytest.mark.slow
def test_fused_region_path_matches_plain_path(pretrain, tmp_path):
    common = [*SMALL, "--epochs", "1", "--no_knn"]
    plain = pretrain.main([*common, "--output_dir", str(tmp_path / "plain")])
    fused = pretrain.main([*common, "--output_dir", str(tmp_path / "fused"), "--fused_region_chunk", "4"])
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    a, b = _teacher_state(tmp_path / "plain"), _teacher_state(tmp_path / "fused")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------------------------ --init (issue 15 item 2)
_INIT_ARCH = ["--arch", "vit_tiny", "--backbone_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}']


def _init_args(pretrain, init: Path, *extra: str):
    return pretrain.parse_args(["--init", str(init), *_INIT_ARCH, *extra])


def test_init_from_another_architecture_fails_with_counts_and_keys(pretrain, tmp_path, capsys):
    import cmd

    other = cmd.create_backbone("vit_tiny", depth=2, patch_size=16, embed_dim=24, num_heads=2)
    path = tmp_path / "other.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in other.model.state_dict().items()}}, path)
    with pytest.raises(SystemExit, match=r"0 of \d+ model tensors would load; \d+ shape mismatches.*cls_token"):
        pretrain.build_network(_init_args(pretrain, path))
    # a partial start must still load something
    with pytest.raises(SystemExit, match=r"nothing loads into vit_tiny.*loaded 0 of"):
        pretrain.build_network(_init_args(pretrain, path, "--init_partial"))


def test_init_partial_loads_what_fits_and_says_so(pretrain, tmp_path, capsys):
    import cmd

    torch.manual_seed(3)
    deeper = cmd.create_backbone("vit_tiny", depth=3, patch_size=8, embed_dim=48, num_heads=3)
    path = tmp_path / "deeper.pth"
    torch.save(deeper.model.state_dict(), path)
    with pytest.raises(SystemExit, match=r"unexpected keys.*blocks\.2\."):
        pretrain.build_network(_init_args(pretrain, path))
    net = pretrain.build_network(_init_args(pretrain, path, "--init_partial"), verbose=True)
    assert torch.equal(net.backbone.model.blocks[1].mlp.fc1.weight, deeper.model.blocks[1].mlp.fc1.weight)
    out = capsys.readouterr().out
    assert re.search(r"initialised from .*: timm checkpoint: loaded \d+ of \d+ tensors; numerics 'timm'.*unexpected", out)


def test_init_from_dino_checkpoint_picks_dino_numerics(pretrain, tmp_path, capsys):
    import cmd

    source = cmd.create_backbone("vit_tiny", depth=2, patch_size=8, embed_dim=48, num_heads=3)
    path = tmp_path / "dino.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.model.state_dict().items()}}, path)
    net = pretrain.build_network(_init_args(pretrain, path), verbose=True)
    assert net.backbone.numerics == "dino"
    assert "numerics 'dino' (chosen from the checkpoint format 'dino'" in capsys.readouterr().out
