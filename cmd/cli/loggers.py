"""Per-step scalars of a training run: a CSV file and/or TensorBoard event files.

``--logger csv`` writes ``output_dir/steps.csv`` (a ``step`` column, then one column per scalar;
`cmd.viz.plot_step_curves` draws it); ``--logger tensorboard`` writes event files under
``output_dir/tensorboard`` (``tensorboard --logdir output_dir``; needs the ``tensorboard`` package:
``pip install cmd-fgvc[tracking]``). Both take a resume step: rows / events after it (written by an
interrupted run after its last checkpoint) are dropped, so the curves match the checkpoint.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> log = build_step_loggers("csv", d, resume_step=0)
    >>> log.log(1, {"loss": 5.0, "lr": 1e-4}); log.close()
    >>> (d / "steps.csv").read_text().splitlines()[0]
    'step,loss,lr'
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LOGGER_CHOICES", "CSVStepLogger", "TensorBoardStepLogger", "StepLoggers", "parse_logger_names",
           "build_step_loggers"]

LOGGER_CHOICES = ("csv", "tensorboard", "none")


def parse_logger_names(text: str) -> list[str]:
    """``"tensorboard,csv"`` -> ``["tensorboard", "csv"]``; ValueError naming an unknown logger."""
    names = [n.strip().lower() for n in str(text).split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGER_CHOICES]
    if unknown or not names:
        raise ValueError(f"--logger {text!r}: choose a comma-separated list of {', '.join(LOGGER_CHOICES)}")
    return [n for n in names if n != "none"]


class CSVStepLogger:
    """``steps.csv``: one row per logged step; a new scalar name rewrites the header (rare)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        if resume_step > 0 and path.exists():  # keep the rows the checkpoint covers
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if r.get("step") and float(r["step"]) <= resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)
        self.rows = []  # kept only while rewriting

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": step, **{k: f"{v:.6g}" for k, v in scalars.items()}}
        new = [k for k in row if k not in self.columns]
        if new:
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))
            self.columns += new
            self.rows.append(row)
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)

    def close(self) -> None:
        pass


class TensorBoardStepLogger:
    """Event files under ``folder`` (``torch.utils.tensorboard``); events after ``resume_step`` are purged."""

    def __init__(self, folder: Path, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise SystemExit(
                "--logger tensorboard needs the tensorboard package: pip install 'cmd-fgvc[tracking]' "
                f"(or pass --logger csv) [{err}]"
            ) from err
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class StepLoggers:
    """Every chosen logger; `log` writes one step's scalars to each."""

    def __init__(self, loggers: list) -> None:
        self.loggers = loggers

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, scalars)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_step_loggers(names: str, output_dir: Path, *, resume_step: int) -> StepLoggers:
    """The loggers named by ``--logger`` writing into ``output_dir``, continuing after ``resume_step``."""
    loggers: list = []
    for name in parse_logger_names(names):
        if name == "csv":
            loggers.append(CSVStepLogger(Path(output_dir) / "steps.csv", resume_step))
        elif name == "tensorboard":
            loggers.append(TensorBoardStepLogger(Path(output_dir) / "tensorboard", resume_step))
    return StepLoggers(loggers)
