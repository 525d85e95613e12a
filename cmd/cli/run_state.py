"""The bookkeeping of a pretraining run: epoch statistics, the log that matches the checkpoint, resume checks.

- `EpochStats`: running sums of the logged terms on the device (no host sync per step); their state
  goes into every checkpoint, so an epoch interrupted and resumed logs the mean over the whole epoch.
- `write_log`: ``log.jsonl`` is rewritten atomically from the checkpoint's history after each save
  (and on resume), so it holds exactly one row per checkpointed, completed epoch.
- `FiniteGuard`: a device-side flag of "this step's loss and gradients are finite"; a non-finite step
  is skipped by the fused optimiser on the device and reported at the ``--log_every`` cadence.
- `resume_plan`: what changed between the checkpoint's run and this one; refuses what cannot continue.
- `append_args_history`: ``args.json`` is a list of runs (one entry per start or resume).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EpochStats",
    "FiniteGuard",
    "NonFiniteLossError",
    "ResumePlan",
    "append_args_history",
    "check_model_options",
    "format_epoch_line",
    "ignore_termination_signals",
    "resume_plan",
    "round_floats",
    "write_jsonl_atomic",
]


class NonFiniteLossError(RuntimeError):
    """A training step gave a non-finite loss or gradient; training stopped without saving."""


def ignore_termination_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM / SIGINT.

    ``timeout``, SLURM and container runtimes signal the whole process group: the main process then
    saves a checkpoint and exits (its workers shut down with it) instead of dying with its workers.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------- logs


def _replace_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temporary file + ``os.replace``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def round_floats(value: Any, digits: int = 6) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits (ints, bools, strings kept).

    Example:
        >>> round_floats({"knn_top1": 67.10000000000001, "step": 31, "lr": [0.000123456789]})
        {'knn_top1': 67.1, 'step': 31, 'lr': [0.000123457]}
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def write_jsonl_atomic(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``path`` by one JSON object per row (temporary file + ``os.replace``); floats are
    written with 6 significant digits (`round_floats`: ``67.1``, not ``67.10000000000001``)."""
    _replace_text(path, "".join(json.dumps(round_floats(dict(r))) + "\n" for r in rows))


def write_json_atomic(path: Path, value: Any) -> None:
    """Replace ``path`` by ``value`` as indented JSON (temporary file + ``os.replace``)."""
    _replace_text(path, json.dumps(value, indent=2) + "\n")


def append_args_history(path: Path, args: Mapping[str, Any], *, resumed_at: Mapping[str, int] | None) -> None:
    """Append this run's options to ``args.json``, a list of runs (an older single dict becomes the first)."""
    runs: list = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
            runs = old if isinstance(old, list) else [{"args": old}]
        except (json.JSONDecodeError, OSError):
            runs = []
    runs.append({
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "resumed_at": dict(resumed_at) if resumed_at else None,
        "args": dict(args),
    })
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(runs, indent=2, default=str))
    os.replace(tmp, path)


def format_epoch_line(record: Mapping[str, Any], epochs: int, out_dim: int | None = None) -> str:
    """A short summary of an epoch's row (the essentials, about 100 characters; log.jsonl has the rest).

    Epoch and step, the loss, the teacher's entropy against log K (``out_dim``; near log K: uniform
    collapse, near 0: one-hot), the k-NN top-1 where measured, a collapse, the time and throughput
    (at most about 115 characters).

    Example:
        >>> format_epoch_line({"epoch": 2, "step": 62, "loss": 4.05361, "teacher_entropy": 2.2543,
        ...                    "knn_top1": 67.1, "epoch_time_s": 20.3, "images_per_s": 48.8}, 10, out_dim=128)
        'epoch 2/10  step 62  loss 4.054  H(P_t) 2.25 / log K 4.85  k-NN 67.10 %  20.3 s  48.8 img/s'
    """
    parts = [f"epoch {record['epoch']}/{epochs}", f"step {record['step']}"]
    if isinstance(record.get("loss"), (int, float)):
        parts.append(f"loss {record['loss']:.4g}")
    if isinstance(record.get("teacher_entropy"), (int, float)):
        parts.append(f"H(P_t) {record['teacher_entropy']:.2f}"
                     + (f" / log K {math.log(out_dim):.2f}" if out_dim else ""))
    if record.get("knn_top1") is not None:
        parts.append(f"k-NN {record['knn_top1']:.2f} %")
    if record.get("collapse"):
        parts.append(f"collapse: {record['collapse']}")
    seconds, speed = record.get("epoch_time_s", 0), record.get("images_per_s", 0)
    parts.append(f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s")
    parts.append(f"{speed:.1f} img/s" if speed < 100 else f"{speed:.0f} img/s")
    return "  ".join(parts)  # peak memory, every term, the schedules: in log.jsonl


# ---------------------------------------------------------------------------------- statistics


class EpochStats:
    """Sums of per-step scalars over an epoch, kept on the device in float64 (no host sync per step).

    ``state_dict()`` (the global sums, already reduced over processes, and the step count) goes into
    each checkpoint; after a resume the epoch's mean covers the steps before and after the stop.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.count = 0
        self.saved_sums = [0.0] * len(self.names)  # from a checkpoint (global, already reduced)
        self.saved_count = 0
        self.saved_time = 0.0

    def add(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Add one step's values (0-d tensors; a missing name counts as NaN); returns them stacked [T]."""
        nan = torch.full((), float("nan"), device=self.sums.device)
        stacked = torch.stack([values.get(n, nan).detach().float().reshape(()) for n in self.names])
        self.sums += stacked.double()
        self.count += 1
        return stacked

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        from cmd.losses.cmd import DEPRECATED_TERM_NAMES  # a checkpoint written before the terms' rename

        saved = {DEPRECATED_TERM_NAMES.get(n, n): v for n, v in zip(state["names"], state["sums"])}
        self.saved_sums = [float(saved.get(n, float("nan"))) for n in self.names]
        self.saved_count, self.saved_time = int(state["count"]), float(state.get("time", 0.0))

    def reduced(self, all_reduce_sum) -> tuple[list[float], int]:
        """Global sums and step count over all processes and the checkpointed part (one collective)."""
        packed = torch.cat([self.sums, self.sums.new_tensor([float(self.count)])])
        packed = all_reduce_sum(packed).cpu().tolist()
        sums = [a + b for a, b in zip(self.saved_sums, packed[:-1])]
        return sums, int(packed[-1]) + self.saved_count

    def state_dict(self, all_reduce_sum, elapsed: float) -> dict[str, Any]:
        sums, count = self.reduced(all_reduce_sum)
        return {"names": self.names, "sums": sums, "count": count, "time": self.saved_time + elapsed}

    def means(self, all_reduce_sum) -> dict[str, float]:
        """The epoch's mean of each scalar (NaN where never finite)."""
        sums, count = self.reduced(all_reduce_sum)
        return {n: s / max(count, 1) for n, s in zip(self.names, sums)}


class FiniteGuard:
    """Keeps "every step so far was finite" on the device; the host reads it at the logging cadence.

    `check_step` computes, without a host sync, whether a step's loss, active terms and gradient norms
    are finite and returns a float ``found_inf`` (1.0 for a bad step) that the fused AdamW kernel
    reads on the device to skip that step: the student then keeps finite weights, so neither the EMA
    teacher nor the loss centers (which skip a non-finite batch on their own) ever receive a NaN.
    `raise_if_bad` (one host read) raises `NonFiniteLossError` naming the first bad step and the terms.
    """

    def __init__(self, names: Sequence[str], device: torch.device) -> None:
        self.names = list(names)
        self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def check_step(self, step: int, values: torch.Tensor, grad_norms: torch.Tensor | None) -> torch.Tensor:
        """``values`` [T] (the guarded terms, in ``names`` order); returns ``found_inf`` (0-d float)."""
        finite = torch.isfinite(values)
        ok = finite.all()
        if grad_norms is not None and grad_norms.numel():
            ok = ok & torch.isfinite(grad_norms).all().to(ok.device)
        self.bad_terms |= ~finite
        self.first_bad = torch.where((self.first_bad < 0) & ~ok, torch.full_like(self.first_bad, step), self.first_bad)
        return (~ok).float()

    def raise_if_bad(self) -> None:
        first = int(self.first_bad)
        if first < 0:
            return
        bad = [n for n, b in zip(self.names, self.bad_terms.tolist()) if b and n != "loss"]
        what = f"term(s) {', '.join(bad)} are NaN/inf" if bad else (
            "the loss is NaN/inf" if bool(self.bad_terms[0]) else "the gradients are NaN/inf")
        raise NonFiniteLossError(
            f"non-finite loss at step {first}: {what}; the step was skipped (teacher and centers untouched), "
            "training stopped and the last good checkpoint was kept (lower the lr, check the inputs, or try --amp off)"
        )


# -------------------------------------------------------------------------------------- resume

# options whose change alters the networks' parameters (the checkpoint cannot load)
MODEL_KEYS = ("arch", "backbone_kwargs", "out_dim", "head_hidden_dim", "head_bottleneck_dim", "norm_last_layer",
              "mil_pooling", "image_input", "share_prototypes", "head_bn", "loss")
# options that decide which samples an epoch holds, in which order, and how many steps it has
ORDER_KEYS = ("batch_size_per_gpu", "world_size", "seed", "dataset", "data_path", "synthetic_classes",
              "synthetic_per_class", "synthetic_image_size")
# options the schedules are computed from (recomputed on resume from the current values)
SCHEDULE_KEYS = ("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "momentum_teacher",
                 "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "batch_size_per_gpu",
                 "world_size")


def check_model_options(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path) -> None:
    """SystemExit naming each model option (`MODEL_KEYS`) whose value differs from the checkpoint's run."""
    model = [f"{_flag(k, saved[k])} -> {_flag(k, current.get(k))}" for k in MODEL_KEYS
             if k in saved and saved[k] != current.get(k)]
    if model:
        raise SystemExit(f"{path} was trained with other model options: {'; '.join(model)}. Resume with the "
                         "checkpoint's options, or start a new run in another --output_dir")


class ResumePlan:
    """Where a resumed run continues: ``epoch``, ``epoch_step`` (steps done in it), global ``step``; ``notes``."""

    def __init__(self, epoch: int, epoch_step: int, step: int, notes: list[str], finished: bool) -> None:
        self.epoch, self.epoch_step, self.step, self.notes, self.finished = epoch, epoch_step, step, notes, finished


def _flag(key: str, value: Any) -> str:
    if key == "world_size":
        return f"world size {value}"
    return f"--{key} {json.dumps(value) if isinstance(value, (dict, list)) else value}"


def resume_plan(meta: Mapping[str, Any], current: Mapping[str, Any], iters_per_epoch: int, path: Path) -> ResumePlan:
    """Compare the checkpoint's run (``meta``: its ``args``, ``epoch``, ``step``, ...) with this one.

    Raises SystemExit (naming each change) when the model changed, when a mid-epoch checkpoint
    would continue with another batch size, world size, seed or dataset (the rest of that epoch
    would not be the samples the stopped run had left), or when ``--epochs`` is below the
    checkpoint's epoch. Returns the position and notes on the options that changed (schedules are
    recomputed from the current options).
    """
    saved = dict(meta.get("args") or {})
    saved.setdefault("world_size", meta.get("world_size", 1))
    epoch, step = int(meta["epoch"]), int(meta["step"])
    saved_ipe = int(meta.get("iters_per_epoch") or iters_per_epoch)  # older checkpoints: as this run's
    epoch_step = int(meta["epoch_step"]) if "epoch_step" in meta else step - epoch * saved_ipe

    def changed(keys: Sequence[str]) -> list[str]:
        return [f"{_flag(k, saved[k])} -> {_flag(k, current.get(k))}" for k in keys
                if k in saved and saved[k] != current.get(k)]

    check_model_options(saved, current, path)
    order = changed(ORDER_KEYS)
    if epoch_step and order:
        raise SystemExit(
            f"{path} stopped in the middle of epoch {epoch + 1} (step {epoch_step} of {saved_ipe}) and these "
            f"options changed: {'; '.join(order)}. The rest of that epoch depends on them: resume with the "
            "checkpoint's values (then change them at the next start, from an epoch boundary)"
        )
    epochs = int(current["epochs"])
    if epochs < epoch or (epochs == epoch and epoch_step):
        raise SystemExit(
            f"{path} is at epoch {epoch + (1 if epoch_step else 0)} but --epochs is {epochs}: nothing to do. "
            f"Pass --epochs > {epoch} to train further, or choose another --output_dir"
        )
    notes = [c for c in changed(tuple(dict.fromkeys((*ORDER_KEYS, *SCHEDULE_KEYS)))) if c]
    if notes:
        notes = [f"resuming with changed options: {'; '.join(notes)} (the lr, weight-decay, teacher-momentum and "
                 "teacher-temperature schedules are recomputed from the current options)"]
    if not epoch_step:
        step = epoch * iters_per_epoch  # an epoch boundary: the position in the current schedule
    return ResumePlan(epoch, epoch_step, step, notes, finished=epochs == epoch)
