"""Tracking (issue 26): the k-NN, the options and the heat maps reach TensorBoard; --logger wandb in
offline mode writes its run; progress bars only on a terminal; a short epoch line; log.jsonl
without float noise."""

from __future__ import annotations

import io
import json
import math
import time

import pytest

from cmd.cli import pretrain
from cmd.cli.loggers import build_step_loggers, parse_logger_names, show_progress
from cmd.cli.run_state import format_epoch_line, round_floats, write_jsonl_atomic
from tests.examples.test_pretrain import SMALL


def test_log_jsonl_has_no_float_noise(tmp_path):
    path = tmp_path / "log.jsonl"
    write_jsonl_atomic(path, [{"epoch": 10, "step": 310, "knn_top1": 67.10000000000001, "lr": 4.86e-04 + 1e-19,
                               "loss": 3.825912345678, "ok": True, "collapse": None, "nan": float("nan")}])
    text = path.read_text()
    assert '"knn_top1": 67.1,' in text and '"epoch": 10,' in text and '"step": 310,' in text
    row = json.loads(text)
    assert row["lr"] == 0.000486 and row["loss"] == 3.82591 and row["ok"] is True and math.isnan(row["nan"])
    assert round_floats([1 / 3, {"a": (2 / 3,)}]) == [0.333333, {"a": [0.666667]}]


def test_epoch_line_is_short_and_has_the_essentials():
    record = {"epoch": 10, "step": 310, "loss": 3.8259123, "image": 4.8493, "region": 2.6804, "inter_level": 0.6108,
              "inter_level_teacher": 1.8878, "teacher_entropy": 4.2789, "teacher_batch_entropy": 4.8226,
              "teacher_region_entropy": 1.5512, "teacher_student_kl": 0.57, "lr": 1.2e-6, "weight_decay": 0.04,
              "teacher_momentum": 0.99999, "teacher_temp": 0.03, "knn_top1": 67.10000000000001,
              "knn_top1_before": 47.8, "images_per_s": 1234.5, "epoch_time_s": 1234.5, "peak_memory_mb": 65432.1,
              "collapse": "uniform", "rankme": 47.3512}
    line = format_epoch_line(record, 100, out_dim=65536)
    assert len(line) <= 130, (len(line), line)  # the longest values; the demo's lines are about 100
    for part in ("epoch 10/100", "loss 3.826", "H(P_t) 4.28 / log K 11.09", "k-NN 67.10 %", "RankMe 47.4", "uniform",
                 "1234 s"):
        assert part in line, part


def test_progress_bars_only_on_a_terminal(monkeypatch):
    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.delenv("CMD_FGVC_PROGRESS", raising=False)
    assert show_progress(False, Stream(True)) and not show_progress(True, Stream(True))
    assert not show_progress(False, Stream(False))  # a redirected log: no bars
    monkeypatch.setenv("CMD_FGVC_PROGRESS", "1")
    assert show_progress(False, Stream(False)) and not show_progress(True, Stream(False))


def test_wandb_is_a_logger_choice():
    assert parse_logger_names("wandb,csv") == ["wandb", "csv"]


@pytest.mark.slow
def test_tensorboard_gets_the_knn_the_hparams_and_the_heat_maps(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    pretrain.main([*SMALL, "--epochs", "2", "--knn_k", "5", "--knn_every", "1", "--logger", "tensorboard", "--viz",
                   "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert f"checkpoint saved to {out / 'checkpoint.pth'}" in printed
    assert all(len(line) <= 120 for line in printed.splitlines() if line.startswith("epoch "))
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    knn = [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/knn_top1")]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert knn == [(0, round(log[0]["knn_top1_before"], 4)), (4, round(log[0]["knn_top1"], 4)),
                   (8, round(log[1]["knn_top1"], 4))]  # before training and at each measurement
    assert "viz/region_weights" in acc.Tags()["images"]
    hparams = EventAccumulator(str(out / "tensorboard" / "hparams"))
    hparams.Reload()
    assert [e.value for e in hparams.Scalars("hparam/knn_top1")] == [pytest.approx(log[1]["knn_top1"])]
    assert "_hparams_/experiment" in hparams.Tags()["tensors"] or hparams.PluginTagToContent("hparams")


@pytest.mark.slow
def test_wandb_offline_run_writes_its_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing reaches the network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    log = build_step_loggers("wandb", tmp_path, resume_step=0, config={"lr": 0.1, "arch": "resnet18"})
    log.log(1, {"loss": 2.0})
    log.log(2, {"loss": 1.5})
    log.log_epoch(2, {"knn_top1_before": 10.0, "knn_top1": 20.0, "loss": 1.5})
    log.log_summary({"lr": 0.1, "arch": "resnet18"}, {"knn_top1": 20.0, "loss": 1.5})
    log.close()  # after the summary: kept open for the pictures
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "region_weights.png")
    log.log_images(2, {"region_weights": tmp_path / "region_weights.png"})
    log.finish()
    (run,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    (records,) = run.glob("run-*.wandb")
    expected = (b"train/loss", b"eval/knn_top1", b"knn_top1_at_step_0", b"resnet18", b"viz/region_weights")
    # wandb's writer is a service process: on a loaded machine (CI with training runs beside it) its last
    # block can reach the disk a moment after finish() returns, so the records are polled for a while
    deadline = time.monotonic() + 60
    while not all(text in (data := records.read_bytes()) for text in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    for text in expected:
        assert text in data, text
    assert list(run.glob("files/media/images/viz/region_weights_*.png"))
    assert (tmp_path / "wandb" / "run_id").read_text().strip() in run.name


def test_cross_weight_option_is_a_deprecated_alias_of_swapped_weight(capsys):
    with pytest.warns(DeprecationWarning, match="--swapped_weight"):
        args = pretrain.parse_args([*SMALL, "--cross_weight", "0.3"])
    assert args.swapped_weight == 0.3 and not hasattr(args, "cross_weight")
    assert "deprecated" in capsys.readouterr().err
    assert pretrain.parse_args([*SMALL, "--swapped_weight", "0.2"]).swapped_weight == 0.2
