"""cmd-fgvc pretrain, issue 24: worker errors, data identity and options on resume, full disk, exit statuses.

Items 1, 3, 4, 11, 16, 20, 21 and 22 (the teardown order). Every run is a few steps of a tiny model.
"""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmd.cli import pretrain
from cmd.cli.options import build_pretrain_parser
from tests.examples.test_pretrain import SMALL  # 4 steps per epoch on the synthetic data

REPO = Path(__file__).resolve().parents[2]
# the SMALL model on an image folder: 16 train images of 32 px, batch 4 -> 4 steps per epoch
FOLDER = [*SMALL, "--batch_size_per_gpu", "4"]  # (the last value of an option wins)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _image_folder(root: Path, per_class: int = 8, classes: tuple[str, ...] = ("a", "b"), test: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test)):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def _folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [*FOLDER, "--dataset", "imagefolder", "--data_path", str(root), "--output_dir", str(out), *extra]


def _nth_image_of_epoch(root: Path, position: int, seed: int = 0, epoch: int = 0) -> Path:
    """The training image at ``position`` of the epoch's shuffled order (DistributedSampler, 1 process)."""
    import cmd

    data = cmd.build_dataset("imagefolder", root, "train")
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    order = torch.randperm(len(data), generator=g).tolist()
    return Path(data.samples[order[position]][0])


def _run_cli(args: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    """Run ``python -m cmd pretrain args`` in its own session; (status or None on timeout, out, err, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "cmd", "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
        out, err = proc.communicate()
        return None, out, err, time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err, time.time() - t0


# ------------------------------------------------------------------- item 1: a worker error must not hang
@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "test"])
def test_unreadable_image_with_workers_exits_1_at_once(tmp_path, split):
    root = _image_folder(tmp_path / "data")
    if split == "train":  # an image of the second batch: one step is done (and saved) first
        bad = _nth_image_of_epoch(root, 5)
        knn = ["--no_knn"]
    else:  # the k-NN monitor's test split (read before training)
        bad = root / "test" / "b" / "1.png"
        knn = ["--knn_k", "3"]
    bad.write_bytes(b"")
    # the same run with good data takes a few seconds (here with a margin for a loaded machine)
    status, out, err, seconds = _run_cli(_folder_args(root, tmp_path / "out", "--num_workers", "2", *knn),
                                         timeout=150)
    assert status is not None, f"still running after {seconds:.0f} s (hang at exit): {err[-1500:]}"
    assert status == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in lines[0], err[-2000:]
    if split == "train":
        ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", map_location="cpu", weights_only=True)
        assert ckpt["epoch_step"] == 1 and "saved to" in lines[0]


# ---------------------------------------------------------------- item 20: a bad image saves the epoch's steps
def test_unreadable_image_mid_epoch_saves_the_steps_done_then_resumes(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    bad = _nth_image_of_epoch(root, 9)  # the third batch: 2 steps done
    good = bad.read_bytes()
    bad.write_bytes(b"")
    out = tmp_path / "out"
    assert pretrain.run(_folder_args(root, out, "--epochs", "1", "--no_knn")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "2 steps done in epoch 1 were saved" in err[0], err
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]) == (0, 2, 2)
    bad.write_bytes(good)  # the file replaced under the same name: the same training set
    result = pretrain.main(_folder_args(root, out, "--epochs", "1", "--no_knn"))
    assert not result["interrupted"] and result["step"] == 4


def test_unreadable_first_batch_saves_nothing_and_says_so(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    _nth_image_of_epoch(root, 0).write_bytes(b"")
    assert pretrain.run(_folder_args(root, tmp_path / "out", "--epochs", "1", "--no_knn")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no step of epoch 1 was done: nothing saved" in err[0], err
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


# ----------------------------------------------------------------------- item 3: a grown dataset on resume
def test_resume_mid_epoch_on_a_grown_dataset_is_refused(tmp_path):
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert pretrain.main(_folder_args(root, out, "--epochs", "2", "--no_knn", "--max_steps", "2"))["interrupted"]
    _image_folder(tmp_path / "more", per_class=8, classes=("c",))
    (root / "train" / "c").symlink_to(tmp_path / "more" / "train" / "c")  # 8 images of a new class
    args_before = (out / "args.json").read_text()
    with pytest.raises(SystemExit, match=r"middle of epoch 1 \(step 2 of 4\).*the training set has 24 images "
                                         r"\(the checkpoint: 16\) and another file list"):
        pretrain.main(_folder_args(root, out, "--epochs", "2", "--no_knn"))
    assert (out / "args.json").read_text() == args_before


def test_same_size_other_files_mid_epoch_is_refused(tmp_path):
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    pretrain.main(_folder_args(root, out, "--epochs", "2", "--no_knn", "--max_steps", "2"))
    (root / "train" / "a" / "0.png").rename(root / "train" / "a" / "renamed.png")
    with pytest.raises(SystemExit, match=r"the training set has another file list"):
        pretrain.main(_folder_args(root, out, "--epochs", "2", "--no_knn"))


def test_grown_dataset_at_an_epoch_boundary_goes_on_with_a_note(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    pretrain.main(_folder_args(root, out, "--epochs", "1", "--no_knn"))
    _image_folder(tmp_path / "more", per_class=8, classes=("c",))
    (root / "train" / "c").symlink_to(tmp_path / "more" / "train" / "c")
    (root / "test" / "c").symlink_to(tmp_path / "more" / "test" / "c")
    capsys.readouterr()
    result = pretrain.main(_folder_args(root, out, "--epochs", "2", "--no_knn"))
    assert "the training set has 24 images (the checkpoint: 16)" in capsys.readouterr().out
    assert result["step"] == 2 * 6  # 6 steps per epoch now; the step is the position in the new schedule
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["data_identity"]["size"] == 24 and ckpt["iters_per_epoch"] == 6


# -------------------------------------------------------------------- item 4: changed options on resume
@pytest.mark.parametrize("change", [["--synthetic_difficulty", "easy"], ["--synthetic_class_hue", "0.5"],
                                    ["--synthetic_clutter", "0.5"], ["--global_size", "24"],
                                    ["--local_crops_number", "1"]])
def test_mid_epoch_resume_with_other_data_or_crops_is_refused(tmp_path, change):
    common = [*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--max_steps", "2"])
    with pytest.raises(SystemExit, match=rf"middle of epoch 1 .*--{change[0][2:]} .* -> {change[0]} {change[1]}"):
        pretrain.main([*common, *change])


def test_loss_options_changed_on_resume_get_the_note(tmp_path, capsys):
    common = [*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--max_steps", "2"])
    capsys.readouterr()
    changes = ["--centering", "sinkhorn", "--koleo_weight", "0.1", "--fused_region_chunk", "4", "--image_weight",
               "0.5", "--student_temp", "0.2"]
    result = pretrain.main([*common, *changes])
    assert not result["interrupted"]
    out = capsys.readouterr().out
    assert "resuming with changed options:" in out
    for flag, value in zip(changes[::2], changes[1::2]):
        assert f"-> {flag} {value}" in out, flag


def test_every_pretrain_option_has_a_resume_policy():
    from cmd.cli.run_state import RESUME_POLICY

    options = {a.dest for a in build_pretrain_parser()._actions if a.dest != "help"}
    missing = sorted(options - set(RESUME_POLICY))
    assert not missing, f"classify these options in cmd.cli.run_state.RESUME_POLICY: {missing}"
    assert set(RESUME_POLICY.values()) == {"model", "epoch", "note", "free"}


# ----------------------------------------------------------------------------- item 11: full disk, logs
@pytest.mark.parametrize("name", ["log.jsonl", "args.json"])
def test_full_disk_on_a_log_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, capsys, name):
    original = pathlib.Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name == name + ".tmp":
            original(self, "")  # the file is created, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert pretrain.run([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ENOSPC" in err[0] and str(tmp_path / name) in err[0], err
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- item 16: no checkpoint was ever written
def _poison_from_step(monkeypatch, first: int) -> None:
    import cmd

    calls = {"n": 0}
    original = cmd.CMDLoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= first:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(cmd.CMDLoss, "forward", poisoned)


def test_non_finite_stop_before_any_checkpoint_does_not_claim_one_was_kept(tmp_path, monkeypatch, capsys):
    _poison_from_step(monkeypatch, 1)
    assert pretrain.run([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint was written" in err and "checkpoint was kept" not in err


def test_non_finite_stop_after_a_checkpoint_names_the_kept_one(tmp_path, monkeypatch, capsys):
    pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)])
    _poison_from_step(monkeypatch, 2)
    assert pretrain.run([*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)]) == 2
    assert f"the last good checkpoint ({tmp_path / 'checkpoint.pth'}) was kept" in capsys.readouterr().err


# -------------------------------------------------------------------------------- item 21: exit statuses
def test_exit_status_is_75_when_interrupted_and_0_when_finished(tmp_path, capsys):
    common = [*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)]
    assert pretrain.run([*common, "--max_steps", "2"]) == 75  # mid-epoch (cmd.cli.exit_status.INTERRUPTED)
    assert pretrain.run(common) == 0  # resumed and finished
    assert pretrain.run(common) == 0  # nothing left to train
    at_boundary = [*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path / "b"), "--max_steps", "4"]
    assert pretrain.run(at_boundary) == 75  # stopped at the end of epoch 1 of 2
    assert pretrain.run(at_boundary) == 0  # the last epoch: finished
    help_text = " ".join(build_pretrain_parser().format_help().split())
    assert "exit status: 0 finished" in help_text and "75 interrupted" in help_text


# ------------------------------------------------------------- item 22: teardown in order on every exit path
def _single_process_group(tmp_path, monkeypatch) -> list[str]:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls: list[str] = []
    barrier, destroy = tdist.barrier, tdist.destroy_process_group
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k))[1])
    monkeypatch.setattr(tdist, "destroy_process_group",
                        lambda *a, **k: (calls.append("destroy"), destroy(*a, **k))[1])
    return calls


def test_clean_exit_waits_for_every_process_then_destroys_the_group(tmp_path, monkeypatch):
    from cmd.cli.common import run_command

    calls = _single_process_group(tmp_path, monkeypatch)
    assert run_command(lambda argv: {"interrupted": False}, []) == 0
    assert calls == ["barrier", "destroy"]
    assert not torch.distributed.is_initialized()


def test_error_exit_destroys_the_group_without_waiting(tmp_path, monkeypatch):
    from cmd.cli.common import run_command

    calls = _single_process_group(tmp_path, monkeypatch)

    def failing(argv):
        raise OSError("disk")

    assert run_command(failing, [], ((OSError, 1),)) == 1
    assert calls == ["destroy"]


def test_training_loader_workers_are_shut_down_before_main_returns(tmp_path):
    import multiprocessing

    pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--num_workers", "2", "--output_dir", str(tmp_path)])
    assert not [p for p in multiprocessing.active_children() if p.daemon]


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_teardown_loop_never_aborts(tmp_path):
    """A few 2-process runs (the teardown of tests/examples/test_pretrain.py's torchrun case): every one exits 0."""
    script = tmp_path / "two.py"
    script.write_text(
        "import sys, torch\n"
        "from cmd.cli.common import run_command\n"
        "from cmd import distributed as dist\n"
        "def main(argv):\n"
        "    dist.init_distributed_from_env()\n"
        "    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))\n"
        "    opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        "    for _ in range(3):\n"
        "        opt.zero_grad(); net(torch.randn(8, 4)).sum().backward(); opt.step()\n"
        "    dist.all_reduce_sum(torch.ones(1))\n"
        "    return {'interrupted': False}\n"
        "sys.exit(run_command(main, None))\n"
    )
    for i in range(3):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script)], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (i, proc.stderr[-3000:])
