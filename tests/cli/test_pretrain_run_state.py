"""cmd-fgvc pretrain: the log follows the checkpoint, resume checks, lock, signals, non-finite guard, tracking.

Issue 15 items 7, 8, 9, 11, 12, 13, 14 and issue 16 section 4. Every run is a few steps of a tiny model.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cmd.cli import pretrain
from tests.examples.test_pretrain import SMALL  # 4 steps per epoch

TIMINGS = {"images_per_s", "epoch_time_s", "peak_memory_mb"}


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _steps(path: Path) -> list[dict]:
    with open(path / "steps.csv", newline="") as f:
        return list(csv.DictReader(f))


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["OMP_NUM_THREADS"] = "1"
    return env


# ------------------------------------------------------------------------- item 7: log.jsonl vs checkpoint
def test_log_after_interruptions_matches_uninterrupted_run(tmp_path):
    common = [*SMALL, "--epochs", "2", "--no_knn"]
    pretrain.main([*common, "--output_dir", str(tmp_path / "full")])
    out = tmp_path / "resumed"
    assert pretrain.main([*common, "--output_dir", str(out), "--max_steps", "3"])["interrupted"]  # mid-epoch 1
    assert not (out / "log.jsonl").exists()  # no completed epoch, no row
    assert pretrain.main([*common, "--output_dir", str(out), "--max_steps", "3"])["interrupted"]  # mid-epoch 2
    with open(out / "log.jsonl", "a") as f:  # a row a killed run wrote after its last checkpoint
        f.write(json.dumps({"epoch": 2, "step": 7, "loss": 1.0}) + "\n")
    pretrain.main([*common, "--output_dir", str(out)])
    full, resumed = _log(tmp_path / "full"), _log(out)
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()
        # RankMe samples the rows of the steps this process ran: a resumed epoch's is over the steps after the resume
        for key in a.keys() - TIMINGS - {"rankme"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
        assert b["rankme"] >= 1.0


# ------------------------------------------------------------------------------- item 8: changed settings
def test_resume_mid_epoch_with_other_batch_size_stops_naming_it(tmp_path):
    common = [*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--max_steps", "3"])
    args_before = (tmp_path / "args.json").read_text()
    with pytest.raises(SystemExit, match=r"middle of epoch 1 \(step 3 of 4\).*--batch_size_per_gpu 8 -> --batch_size_per_gpu 4"):
        pretrain.main([*common, "--batch_size_per_gpu", "4"])
    assert (tmp_path / "args.json").read_text() == args_before


def test_batch_size_change_at_an_epoch_boundary_continues_from_the_right_position(tmp_path, capsys):
    common = [*SMALL, "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--epochs", "1"])
    result = pretrain.main([*common, "--epochs", "2", "--batch_size_per_gpu", "4"])  # 8 steps per epoch now
    assert result["step"] == 1 * 8 + 8 and result["epoch"] == 2
    assert "--batch_size_per_gpu 8 -> --batch_size_per_gpu 4" in capsys.readouterr().out
    assert [r["epoch"] for r in _log(tmp_path)] == [1, 2]


def test_resume_with_other_model_options_names_them(tmp_path):
    common = [*SMALL, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--max_steps", "4"])
    with pytest.raises(SystemExit, match=r"other model options: --out_dim 64 -> --out_dim 32"):
        pretrain.main([*common, "--out_dim", "32"])


def test_epochs_below_checkpoint_stops_and_equal_does_nothing(tmp_path, capsys):
    common = [*SMALL, "--no_knn", "--output_dir", str(tmp_path)]
    pretrain.main([*common, "--epochs", "2"])
    with pytest.raises(SystemExit, match=r"at epoch 2 but --epochs is 1: nothing to do"):
        pretrain.main([*common, "--epochs", "1"])
    result = pretrain.main([*common, "--epochs", "2"])
    assert result["step"] == 8 and "nothing to train" in capsys.readouterr().out


# ---------------------------------------------------------- issue 16 section 4: extending recomputes schedules
def test_extending_a_finished_run_recomputes_every_schedule(tmp_path, capsys):
    common = [*SMALL, "--no_knn", "--warmup_teacher_temp_epochs", "2"]
    pretrain.main([*common, "--epochs", "2", "--output_dir", str(tmp_path / "fresh")])
    pretrain.main([*common, "--epochs", "1", "--output_dir", str(tmp_path / "extended")])
    capsys.readouterr()
    pretrain.main([*common, "--epochs", "2", "--output_dir", str(tmp_path / "extended")])
    assert "--epochs 1 -> --epochs 2" in capsys.readouterr().out
    fresh, extended = _steps(tmp_path / "fresh"), _steps(tmp_path / "extended")
    assert [r["step"] for r in extended] == [str(s) for s in range(1, 9)]  # one row per step, none repeated
    for a, b in zip(fresh[4:], extended[4:]):  # epoch 2 on
        for key in ("lr", "weight_decay", "teacher_momentum", "teacher_temp"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), (a["step"], key)
    assert float(extended[-1]["teacher_momentum"]) < 1.0  # the teacher is not frozen
    history = json.loads((tmp_path / "extended" / "args.json").read_text())
    assert [run["args"]["epochs"] for run in history] == [1, 2]
    assert history[1]["resumed_at"] == {"epoch": 1, "step": 4}


# ------------------------------------------------------------------------- item 9: NaN never reaches the teacher
def test_injected_nan_stops_before_the_teacher_or_centers_see_it(tmp_path, monkeypatch):
    import cmd

    calls = {"n": 0}
    original = cmd.CMDLoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # step 2: a NaN loss (and NaN gradients)
            out.terms["image"] = out.terms["image"] * float("nan")
            out.loss = out.loss * float("nan")
        return out

    seen = []
    original_update = cmd.EMATeacher.update

    def spy(self, student, *args, **kwargs):
        m = original_update(self, student, *args, **kwargs)
        seen.append(all(bool(torch.isfinite(t).all()) for t in self.teacher.state_dict().values()))
        return m

    centers = []
    original_center = cmd.losses.center.Center.update

    def center_spy(self):
        original_center(self)
        centers.append(bool(torch.isfinite(self.value).all()))

    monkeypatch.setattr(cmd.CMDLoss, "forward", poisoned)
    monkeypatch.setattr(cmd.EMATeacher, "update", spy)
    monkeypatch.setattr(cmd.losses.center.Center, "update", center_spy)
    with pytest.raises(pretrain.NonFiniteLossError, match=r"step 2: term\(s\) image"):
        pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--log_every", "3", "--output_dir", str(tmp_path)])
    assert len(seen) == 3 and all(seen)  # steps 1-3 updated the teacher, always finite
    assert centers and all(centers)
    assert not (tmp_path / "checkpoint.pth").exists()


# ------------------------------------------------------------------ item 11: SIGTERM to the process group
@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_exits(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmd", "pretrain", *SMALL, "--epochs", "50", "--no_knn", "--num_workers", "2",
         "--output_dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGTERM)  # what timeout, SLURM and container runtimes do
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, err[-2000:]  # interrupted, resumable (cmd.cli.exit_status)
    assert "stopped at step" in out and "killed by signal" not in err
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] > 4
    assert len(_log(tmp_path)) == ckpt["epoch"]


# --------------------------------------------------------------------- item 12: one run per output folder
@pytest.mark.slow
def test_second_run_in_the_same_folder_is_refused_and_a_dead_holder_does_not_block(tmp_path):
    first = subprocess.Popen(
        [sys.executable, "-m", "cmd", "pretrain", *SMALL, "--epochs", "50", "--no_knn", "--output_dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not (tmp_path / "log.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-2000:]
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {first.pid} on host "):
            pretrain.main([*SMALL, "--epochs", "50", "--no_knn", "--output_dir", str(tmp_path)])
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lock file stays, the lock goes
        first.communicate()
    result = pretrain.main([*SMALL, "--epochs", "50", "--no_knn", "--output_dir", str(tmp_path), "--max_steps", "1"])
    assert result["interrupted"]


# --------------------------------------------------------------- item 14: a failed start writes nothing
@pytest.mark.parametrize("bad", [["--dataset", "imagefolder"], ["--dataset", "imagefolder", "--data_path", "/nonexistent"],
                                 ["--logger", "bogus"]])
def test_failed_start_writes_nothing(tmp_path, bad):
    new = tmp_path / "new"
    with pytest.raises(SystemExit):
        pretrain.main([*SMALL, *bad, "--output_dir", str(new)])
    assert not new.exists()
    (tmp_path / "args.json").write_text("a real run's options")
    with pytest.raises(SystemExit):
        pretrain.main([*SMALL, *bad, "--output_dir", str(tmp_path)])
    assert (tmp_path / "args.json").read_text() == "a real run's options"


# --------------------------------------------------------------------------------- item 13: ENOSPC, one line
def test_full_disk_is_reported_in_one_line(tmp_path, monkeypatch, capsys):
    import cmd

    def full(path, **state):
        raise OSError(errno.ENOSPC, f"No space left on device (ENOSPC) while writing checkpoint {path}")

    monkeypatch.setattr(cmd, "save_checkpoint", full)
    assert pretrain.run([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "ENOSPC" in err[0]


# --------------------------------------------------------------------------- issue 16 section 4: tracking
def test_step_scalars_to_csv_and_tensorboard_and_knn_in_the_log(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("CMD_FGVC_PROGRESS", "1")  # bars although stderr is captured (not a terminal)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad.*")  # float(out.loss) without detach
        pretrain.main([*[a for a in SMALL if a != "--no_progress"], "--epochs", "2", "--knn_k", "5",
                       "--logger", "tensorboard,csv", "--output_dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert "k-NN: features of the test split" in captured.err
    assert "epoch 2/2  step 8  loss " in captured.out and "{" not in captured.out
    rows = _steps(tmp_path)
    assert len(rows) == 8
    for key in ("loss", "image", "region", "inter_level", "lr", "weight_decay", "teacher_momentum", "teacher_temp",
                "teacher_entropy", "teacher_batch_entropy", "teacher_student_kl", "images_per_s"):
        assert rows[0][key] != "", key
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/teacher_momentum", "train/teacher_entropy"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("eval/rankme")] == [4, 8]  # per epoch, at its last step
    log = _log(tmp_path)
    assert "knn_top1_before" in log[0] and "knn_top1" in log[1]
    from cmd import viz

    viz.plot_knn_over_epochs(tmp_path / "log.jsonl", tmp_path / "knn.png")
    viz.plot_step_curves(tmp_path / "steps.csv", tmp_path / "steps.png")
