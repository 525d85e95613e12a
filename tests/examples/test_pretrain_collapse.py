"""The pretraining program's collapse watch and anti-collapse options (issue 13, point 1).

A teacher temperature of 100 makes the teacher's distributions uniform from the first step (its
logits are O(1)): a forced uniform collapse on the SMALL settings of test_pretrain.py.
"""

from __future__ import annotations

import json
import math

import pytest

from cmd.cli import pretrain
from cmd.cli.collapse import CollapseStop, CollapseWatch
from tests.examples.test_pretrain import SCRIPT, SMALL

UNIFORM = ["--teacher_temp", "100", "--warmup_teacher_temp", "100"]


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_uniform_collapse_warns_once_and_is_logged(tmp_path, capsys):
    result = pretrain.main([*SMALL, *UNIFORM, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert err.count("uniform collapse") == 1, err  # once, although every step is diagnosed
    assert "lower the teacher temperature" in err and "--center_momentum" in err
    assert not result["interrupted"] and result["collapses"] == {"uniform": 1}
    assert [row.get("collapse") for row in _log(tmp_path)] == ["uniform", "uniform"]


def test_healthy_run_logs_no_collapse(tmp_path, capsys):
    result = pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path)])
    assert result["collapses"] == {}
    assert "collapse" not in _log(tmp_path)[0]
    assert "collapse" not in capsys.readouterr().err


def test_stop_on_collapse_saves_and_exits_with_status_3(tmp_path, capsys):
    argv = [*SMALL, *UNIFORM, "--epochs", "2", "--no_knn", "--output_dir", str(tmp_path), "--stop_on_collapse", "true"]
    assert pretrain.run(argv) == 3
    err = capsys.readouterr().err
    assert "error: the teacher collapsed (uniform, diagnosed at step 1)" in err and "--stop_on_collapse" in err
    assert (tmp_path / "checkpoint.pth").exists()
    (row,) = _log(tmp_path)
    assert row["collapse"] == "uniform" and row["stopped_at_step"] == 1
    with pytest.raises(CollapseStop):  # resumed, it stops again at once (step 2: the log cadence is 1)
        pretrain.main(argv)


def test_collapse_watch_once_per_kind_and_remedies(capsys):
    k = 128
    watch = CollapseWatch(k, stop=False, verbose=True)
    uniform = {"teacher_entropy": math.log(k), "teacher_batch_entropy": math.log(k)}
    one_hot = {"teacher_entropy": 0.01, "teacher_batch_entropy": 0.02}
    healthy = {"teacher_entropy": 1.0, "teacher_batch_entropy": 0.9 * math.log(k)}
    assert [watch.check(s, i) for i, s in enumerate([healthy, uniform, uniform, one_hot, one_hot], 1)] == [
        None, "uniform", "uniform", "one_hot", "one_hot"]
    assert watch.seen == {"uniform": 2, "one_hot": 4} and not watch.stop_requested
    err = capsys.readouterr().err
    assert err.count("uniform collapse") == 1 and err.count("one-hot collapse") == 1
    assert "--centering sinkhorn" in err and "--head_bn true" in err and "--lr" in err
    watch.new_epoch()
    assert watch.epoch_kind is None
    assert watch.check({"teacher_entropy": float("nan"), "teacher_batch_entropy": 1.0}, 6) is None
    assert watch.check({}, 7) is None  # entropies not computed


def test_collapse_watch_stop_flag():
    watch = CollapseWatch(64, stop=True, verbose=False)
    assert watch.check({"teacher_entropy": 0.0, "teacher_batch_entropy": 0.0}, 3) == "one_hot"
    assert watch.stop_requested and watch.last == ("one_hot", 3)


@pytest.mark.parametrize("extra", [["--head_bn", "true"], ["--centering", "sinkhorn"], ["--koleo_weight", "0.1"]],
                         ids=["head_bn", "sinkhorn", "koleo"])
def test_anti_collapse_options_run(tmp_path, extra):
    result = pretrain.main([*SMALL, "--epochs", "1", "--no_knn", "--output_dir", str(tmp_path), *extra])
    assert math.isfinite(result["loss"])
    if "--koleo_weight" in extra:
        assert math.isfinite(result["koleo"])
    if "--head_bn" in extra:
        import torch

        state = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]
        assert any("running_mean" in key and key.startswith("head.") for key in state)


@pytest.mark.parametrize("argv, message", [
    (["--koleo_weight", "-1"], "--koleo_weight: must be >= 0"),
    (["--centering", "median"], "--centering: invalid choice"),
    (["--head_bn", "maybe"], "--head_bn"),
    (["--stop_on_collapse", "2"], "--stop_on_collapse"),
])
def test_option_range_checks(argv, message, capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_on_collapse_under_torchrun_stops_every_process(tmp_path):
    """Both processes reach the same verdict (entropies averaged over them) and stop together with status 3."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         *SMALL, *UNIFORM, "--epochs", "2", "--no_knn", "--batch_size_per_gpu", "4", "--stop_on_collapse", "true",
         "--output_dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode != 0 and "--stop_on_collapse is set" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("uniform collapse") == 1  # rank 0 only
    (row,) = _log(tmp_path)
    assert row["collapse"] == "uniform" and row["stopped_at_step"] == 1
