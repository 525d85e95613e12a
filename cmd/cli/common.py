"""What both ``cmd-fgvc`` commands need: the dataset from the options, the device, user-facing errors.

Errors meant for the user of a command are raised as `SystemExit` with one line that names the
command-line flags to change (never a Python keyword such as ``strict=False``).

Example:
    >>> from cmd.cli.common import rounded
    >>> rounded({"top1": 15.999999999999998, "k": 20})
    {'top1': 16.0, 'k': 20}
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from cmd import distributed as dist

__all__ = ["build_data", "cli_message", "resolve_device", "rounded", "run_command"]

_LAYOUT = "DATA/train/<class>/<image> and DATA/test/<class>/<image>"


def cli_message(err: BaseException) -> str:
    """The error's text as one line, without the hints meant for Python callers."""
    text = " ".join(str(err).split())
    text = re.sub(r"\s*Pass strict=False to load what fits and get a LoadReport\.?", "", text)
    text = re.sub(r";?\s*pass split='' to read root/<class>/<image>\)?", ")", text)
    return text.replace("))", ")")


def build_data(args: argparse.Namespace, split: str, transform: Any, *, command: str, **synthetic: Any):
    """`cmd.training.build_data` with errors that name the flags to change (``--data_path``, ``--no_knn``).

    ``command`` ("pretrain" or "evaluate") chooses the advice given when the split is missing.
    ``synthetic`` goes to `cmd.SyntheticFineGrained` (e.g. ``return_part_mask=True``).
    """
    from cmd.training import build_data as _build_data

    if args.dataset == "digits":
        try:
            return _build_data(args, split, transform)
        except ImportError as err:
            raise SystemExit(f"--dataset digits: {err}") from err
    if args.dataset == "synthetic":
        return _build_data(args, split, transform, **synthetic)
    if args.data_path is None:
        raise SystemExit(f"--data_path is required for --dataset {args.dataset}")
    try:
        return _build_data(args, split, transform, **synthetic)
    except ValueError as err:  # e.g. a test split with classes the train split lacks
        raise SystemExit(f"--data_path {args.data_path} ({split} split): {cli_message(err)}") from err
    except FileNotFoundError as err:
        if split != "test":
            raise SystemExit(f"--data_path {args.data_path}: no {split} split: {cli_message(err)}") from err
        if command == "pretrain":
            advice = (f"the k-NN monitor needs a test split: pass --no_knn to pretrain without it, or lay out "
                      f"the folder as {_LAYOUT}")
        else:
            advice = f"evaluation needs a train split (memory / training set) and a test split: lay out {_LAYOUT}"
        raise SystemExit(f"--data_path {args.data_path} has no test split ({cli_message(err)}); {advice}") from err


def resolve_device(requested: str | None) -> torch.device:
    """``--device`` (already checked by the parser), or cuda when available; one GPU per process."""
    from cmd import distributed as dist

    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and dist.is_dist():
        import os

        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded to ``digits`` significant digits, through dicts and lists (for results.json).

    ``15.999999999999998`` becomes ``16.0``; a learning rate such as ``0.00025`` stays as it is.
    """
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def run_command(main: Callable[[list[str] | None], Any], argv: list[str] | None,
                errors: tuple[tuple[type[BaseException], int], ...] = (),
                status: Callable[[Any], int] | None = None) -> int:
    """Run a command's ``main(argv)``; return its exit status (see `cmd.cli.exit_status`).

    ``status(result)`` maps what ``main`` returned to a status (default 0). An error listed in
    ``errors`` is printed as one ``error: ...`` line and gives the status paired with it. On the
    way out the distributed process group is destroyed (after a barrier when ``main`` returned
    normally); data-loading workers still alive after an error (they ignore SIGTERM) are killed at
    interpreter exit instead of being waited for (`cmd.cli.teardown.install_exit_hook`).
    """
    from cmd.cli.data_guard import loader_error_line
    from cmd.cli.teardown import finish_distributed, install_exit_hook

    install_exit_hook()
    clean = False
    try:
        result = main(argv)
        clean = True
    except tuple(e for e, _ in errors) as err:
        print(f"error: {loader_error_line(err)}", file=sys.stderr)  # one line, also for a worker's error
        return next(code for e, code in errors if isinstance(err, e))
    finally:
        if dist.is_dist():
            finish_distributed(clean=clean)
    return status(result) if status is not None else 0
