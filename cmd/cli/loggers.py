"""What a training run reports: per-step scalars to a CSV file, TensorBoard and/or Weights & Biases.

``--logger csv`` writes ``output_dir/steps.csv`` (a ``step`` column, then one column per scalar;
`cmd.viz.plot_step_curves` draws it); ``--logger tensorboard`` writes event files under
``output_dir/tensorboard`` (``tensorboard --logdir output_dir``); ``--logger wandb`` logs to a
Weights & Biases run (files under ``output_dir/wandb``; project ``$WANDB_PROJECT`` or ``cmd-fgvc``;
``WANDB_MODE=offline`` keeps it on the machine, ``wandb sync`` uploads it later). The last two need
``pip install "cmd-fgvc[tracking]"``. Each takes a resume step: rows / events after it (written by
an interrupted run after its last checkpoint) are dropped, so the curves match the checkpoint.

Besides the per-step ``train/*`` scalars, TensorBoard and W&B get the k-NN top-1 of the teacher at
each measurement (``eval/knn_top1``, the headline metric), the run's options with the final k-NN as
its metric (TensorBoard's HPARAMS tab, W&B's config and summary) and, with ``--viz``, the pictures
(``viz/region_weights`` ...).

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
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LOGGER_CHOICES", "CSVStepLogger", "TensorBoardStepLogger", "WandbStepLogger", "StepLoggers",
           "parse_logger_names", "build_step_loggers", "show_progress"]

LOGGER_CHOICES = ("csv", "tensorboard", "wandb", "none")
_TRACKING = "pip install 'cmd-fgvc[tracking]'"


def show_progress(no_progress: bool, stream: Any = None) -> bool:
    """Whether to draw progress bars: not with ``--no_progress``, nor when the bars' stream (stderr,
    where tqdm writes) is not a terminal (a redirected log would fill with them), unless the
    environment variable ``CMD_FGVC_PROGRESS=1`` forces them."""
    if no_progress:
        return False
    if os.environ.get("CMD_FGVC_PROGRESS", "") == "1":
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


def _hparam_value(value: Any) -> Any:
    """An option's value as TensorBoard's hparams accept it (int, float, str, bool)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


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

    def log_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        pass  # the k-NN is in log.jsonl

    def log_summary(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        pass

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardStepLogger:
    """Event files under ``folder`` (``torch.utils.tensorboard``); events after ``resume_step`` are purged."""

    def __init__(self, folder: Path, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise SystemExit(
                f"--logger tensorboard needs the tensorboard package: {_TRACKING} (or pass --logger csv) [{err}]"
            ) from err
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def log_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        self.writer.flush()

    def log_summary(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The run's options with its final metrics (the HPARAMS tab), in this run's folder."""
        self.writer.add_hparams({k: _hparam_value(v) for k, v in hparams.items()},
                                {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name="hparams")
        self.writer.flush()

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        import numpy as np
        from PIL import Image

        for name, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(f"viz/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()  # a later write reopens a new event file in the same folder


class WandbStepLogger:
    """A Weights & Biases run under ``folder`` (``wandb``); its id is kept in ``folder/run_id`` so a
    resumed training run continues the same W&B run (steps up to ``resume_step`` are not re-logged)."""

    def __init__(self, folder: Path, resume_step: int, config: Mapping[str, Any] | None = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise SystemExit(
                f"--logger wandb needs the wandb package: {_TRACKING} (or pass --logger csv) [{err}]"
            ) from err
        self.wandb = wandb
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if resume_step > 0 and id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cmd-fgvc"), dir=str(folder), id=run_id,
                              resume="allow", config=dict(config or {}))
        self.min_step = self.last_step = resume_step

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if step > self.min_step:
            self.run.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
            self.last_step = max(self.last_step, step)

    def log_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        """At ``step``; W&B's steps only increase: a value for an earlier step (the k-NN before
        training, step 0) goes to the run's summary as ``{name}_at_step_{step}``."""
        if step >= self.last_step:
            self.run.log({f"eval/{k}": v for k, v in scalars.items()}, step=step)
            self.last_step = step
            for k, v in scalars.items():
                self.run.summary[k] = v
        else:
            for k, v in scalars.items():
                self.run.summary[f"{k}_at_step_{step}"] = v

    def log_summary(self, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        self.run.config.update(dict(hparams), allow_val_change=True)
        for k, v in metrics.items():
            self.run.summary[k] = v

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        self.run.log({f"viz/{k}": self.wandb.Image(str(p)) for k, p in images.items()}, step=max(step, self.last_step))

    def close(self) -> None:
        self.run.finish()


class StepLoggers:
    """Every chosen logger: `log` writes one step's scalars to each, `log_epoch` an epoch's k-NN,
    `log_summary` the options and final metrics, `log_images` pictures; `close` ends them.

    After `log_summary` (the last epoch) `close` only flushes, so that the pictures drawn after
    training still reach the same run; `finish` then ends every logger (idempotent).
    """

    def __init__(self, loggers: Sequence) -> None:
        self.loggers = list(loggers)
        self.keep_open = False

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log(step, scalars)

    def log_epoch(self, step: int, record: Mapping[str, Any]) -> None:
        """An epoch's row of log.jsonl: its k-NN top-1 where measured (the value before training at step 0)
        and the RankMe of the teacher's image vectors (``eval/rankme``), at the epoch's last step."""
        if record.get("knn_top1_before") is not None:
            for logger in self.loggers:
                logger.log_eval(0, {"knn_top1": float(record["knn_top1_before"])})
        scalars = {k: float(record[k]) for k in ("knn_top1", "rankme") if record.get(k) is not None}
        if scalars:
            for logger in self.loggers:
                logger.log_eval(step, scalars)

    def log_summary(self, hparams: Mapping[str, Any], metrics: Mapping[str, float | None]) -> None:
        """The run's options and its final metrics (None ones left out); keeps the loggers open for `log_images`."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        for logger in self.loggers:
            logger.log_summary(hparams, metrics)
        self.keep_open = True

    def log_images(self, step: int, images: Mapping[str, Path]) -> None:
        for logger in self.loggers:
            logger.log_images(step, images)

    def close(self) -> None:
        if self.keep_open:  # finished training: the pictures come next (`finish`)
            for logger in self.loggers:
                if hasattr(logger, "writer"):
                    logger.writer.flush()
            return
        self.finish()

    def finish(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


def build_step_loggers(names: str, output_dir: Path, *, resume_step: int,
                       config: Mapping[str, Any] | None = None) -> StepLoggers:
    """The loggers named by ``--logger`` writing into ``output_dir``, continuing after ``resume_step``;
    ``config``: the run's options (W&B's run config)."""
    loggers: list = []
    for name in parse_logger_names(names):
        if name == "csv":
            loggers.append(CSVStepLogger(Path(output_dir) / "steps.csv", resume_step))
        elif name == "tensorboard":
            loggers.append(TensorBoardStepLogger(Path(output_dir) / "tensorboard", resume_step))
        elif name == "wandb":
            loggers.append(WandbStepLogger(Path(output_dir) / "wandb", resume_step, config))
    return StepLoggers(loggers)
