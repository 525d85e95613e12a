"""The bookkeeping of a pretraining run: epoch statistics, the log that matches the checkpoint, resume checks.

- `EpochStats`: running sums of the logged terms on the device (no host sync per step); their state
  goes into every checkpoint, so an epoch interrupted and resumed logs the mean over the whole epoch.
- `write_log`: ``log.jsonl`` is rewritten atomically from the checkpoint's history after each save
  (and on resume), so it holds exactly one row per checkpointed, completed epoch.
- `FiniteGuard`: a device-side flag of "this step's loss and gradients are finite"; a non-finite step
  is skipped by the fused optimiser on the device and reported at the ``--log_every`` cadence.
- `resume_plan`: what changed between the checkpoint's run and this one; refuses what cannot continue
  (`RESUME_POLICY`: one table classifying every option; the training set's identity from
  `cmd.cli.data_identity`).
- `append_args_history`: ``args.json`` is a list of runs (one entry per start or resume).
"""

from __future__ import annotations

import datetime
import errno
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cmd.cli.data_identity import describe_change
from cmd.cli.teardown import ignore_termination_signals

__all__ = [
    "EpochStats",
    "FiniteGuard",
    "NonFiniteLossError",
    "RESUME_POLICY",
    "ResumePlan",
    "append_args_history",
    "check_model_options",
    "format_epoch_line",
    "ignore_termination_signals",
    "resume_plan",
    "round_floats",
    "write_json_atomic",
    "write_jsonl_atomic",
]


class NonFiniteLossError(RuntimeError):
    """A training step gave a non-finite loss or gradient; training stopped without saving."""


# ----------------------------------------------------------------------------------------- logs


def _replace_text(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically (temporary file + ``os.replace``).

    A failed write (a full disk: ``ENOSPC``) raises an OSError naming ``path``, after removing the
    temporary file; ``path`` keeps its previous contents.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        code = err.errno or errno.EIO
        name = errno.errorcode.get(code, str(code))
        raise OSError(code, f"{err.strerror or err} ({name}) while writing {path}; its previous contents are "
                            "kept") from err


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
    _replace_text(path, json.dumps(runs, indent=2, default=str) + "\n")


def format_epoch_line(record: Mapping[str, Any], epochs: int, out_dim: int | None = None) -> str:
    """A short summary of an epoch's row (the essentials, about 100 characters; log.jsonl has the rest).

    Epoch and step, the loss, the teacher's entropy against log K (``out_dim``; near log K: uniform
    collapse, near 0: one-hot), the k-NN top-1 where measured, the RankMe of the teacher's image
    vectors, a collapse, the time and throughput (at most about 130 characters).

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
    if record.get("rankme") is not None:
        parts.append(f"RankMe {record['rankme']:.1f}")
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

    def __init__(self, names: Sequence[str], device: torch.device, checkpoint: Path | None = None) -> None:
        self.names = list(names)
        self.checkpoint = checkpoint  # the run's checkpoint file: the message says whether one was kept
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
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            kept = "no checkpoint was written (none had been saved before this step)"
        else:
            kept = "the last good checkpoint" + (f" ({self.checkpoint})" if self.checkpoint else "") + " was kept"
        raise NonFiniteLossError(
            f"non-finite loss at step {first}: {what}; the step was skipped (teacher and centers untouched), "
            f"training stopped and {kept} (lower the lr, check the inputs, or try --amp off)"
        )


# -------------------------------------------------------------------------------------- resume

# What a resume does when an option differs from the checkpoint's run: one table for every option.
#   "model": refused (the networks' parameters differ: the checkpoint cannot load);
#   "epoch": refused when the checkpoint stopped mid-epoch (the option decides which samples, in which
#            order, or which crops the rest of that epoch holds: it would not be the epoch the stopped run
#            had left); at an epoch boundary the run goes on with a note;
#   "note":  allowed, with the "resuming with changed options" note (schedules are recomputed from the
#            current options; a loss or optimisation option applies from the resumed step on);
#   "free":  allowed silently (no effect on what is trained: paths, logging, monitoring, workers; --init
#            is replaced by the checkpoint's weights on a resume).
# An option missing from the table is treated as "note". The training set itself (its size and file
# list, `cmd.cli.data_identity`) is checked as an "epoch" option.
RESUME_POLICY: dict[str, str] = {
    **dict.fromkeys(("arch", "backbone_kwargs", "out_dim", "head_hidden_dim", "head_bottleneck_dim",
                     "norm_last_layer", "mil_pooling", "image_input", "share_prototypes", "head_bn", "loss"),
                    "model"),
    **dict.fromkeys(("batch_size_per_gpu", "world_size", "seed", "dataset", "data_path", "synthetic_classes",
                     "synthetic_per_class", "synthetic_image_size", "synthetic_difficulty", "synthetic_class_hue",
                     "synthetic_clutter", "global_size", "local_size", "local_crops_number", "global_crops_scale",
                     "local_crops_scale", "color_jitter", "blur_sigma", "solarization_prob"), "epoch"),
    **dict.fromkeys(("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                     "momentum_teacher", "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs",
                     "student_temp", "centering", "center_momentum", "koleo_weight", "image_weight",
                     "region_weight", "inter_weight", "swapped_weight", "cross_weight", "fused_region_chunk",
                     "clip_grad", "freeze_last_layer", "amp", "compile", "drop_path"), "note"),
    **dict.fromkeys(("config", "output_dir", "device", "num_workers", "no_progress", "log_every", "logger",
                     "max_steps", "knn_every", "knn_k", "no_knn", "eval_size", "saveckp_freq", "stop_on_collapse",
                     "supervised_reference", "viz", "init", "init_key", "init_partial",
                     "recipe", "print_config"), "free"),  # a --recipe's values are the options it sets, checked one by one
}
MODEL_KEYS = tuple(k for k, v in RESUME_POLICY.items() if v == "model")
ORDER_KEYS = tuple(k for k, v in RESUME_POLICY.items() if v == "epoch")


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


def resume_plan(meta: Mapping[str, Any], current: Mapping[str, Any], iters_per_epoch: int, path: Path,
                data: Mapping[str, Any] | None = None) -> ResumePlan:
    """Compare the checkpoint's run (``meta``: its ``args``, ``epoch``, ``step``, ...) with this one.

    Follows `RESUME_POLICY`: raises SystemExit (naming each change) when a "model" option changed,
    or when a mid-epoch checkpoint would continue with another "epoch" option (batch size, world
    size, seed, dataset, crops), on another training set (``data``, from
    `cmd.cli.data_identity.data_identity`, against the checkpoint's ``data_identity``) or with
    another number of steps per epoch; also when ``--epochs`` is below the checkpoint's epoch.
    Returns the position and a note naming every other option that changed ("epoch" ones at an
    epoch boundary, "note" ones, and a changed training set at a boundary).
    """
    saved = dict(meta.get("args") or {})
    saved.setdefault("world_size", meta.get("world_size", 1))
    epoch, step = int(meta["epoch"]), int(meta["step"])
    saved_ipe = int(meta.get("iters_per_epoch") or iters_per_epoch)  # older checkpoints: as this run's
    epoch_step = int(meta["epoch_step"]) if "epoch_step" in meta else step - epoch * saved_ipe

    def changed(kinds: Sequence[str]) -> list[str]:
        keys = [k for k in dict.fromkeys((*saved, *current)) if RESUME_POLICY.get(k, "note") in kinds]
        return [f"{_flag(k, saved.get(k))} -> {_flag(k, current.get(k))}" for k in keys
                if k in saved and k in current and saved[k] != current[k]]

    check_model_options(saved, current, path)
    order = changed(("epoch",))
    data_change = describe_change(meta.get("data_identity"), data) if data is not None else None
    if data_change:
        order.append(data_change)
    if epoch_step and saved_ipe != iters_per_epoch and not order:
        order.append(f"{iters_per_epoch} steps per epoch (the checkpoint: {saved_ipe})")
    if epoch_step and order:
        raise SystemExit(
            f"{path} stopped in the middle of epoch {epoch + 1} (step {epoch_step} of {saved_ipe}) and these "
            f"options changed: {'; '.join(order)}. The rest of that epoch depends on them: resume with the "
            "checkpoint's values and data (then change them at the next start, from an epoch boundary)"
        )
    epochs = int(current["epochs"])
    if epochs < epoch or (epochs == epoch and epoch_step):
        raise SystemExit(
            f"{path} is at epoch {epoch + (1 if epoch_step else 0)} but --epochs is {epochs}: nothing to do. "
            f"Pass --epochs > {epoch} to train further, or choose another --output_dir"
        )
    notes = [*order, *changed(("note",))]
    if notes:
        notes = [f"resuming with changed options: {'; '.join(notes)} (the lr, weight-decay, teacher-momentum and "
                 "teacher-temperature schedules are recomputed from the current options; loss and data options "
                 "apply from here on)"]
    if not epoch_step:
        step = epoch * iters_per_epoch  # an epoch boundary: the position in the current schedule
    return ResumePlan(epoch, epoch_step, step, notes, finished=epochs == epoch)
