"""The training program's collapse watch: diagnose, warn once per kind, record, optionally stop.

`CollapseWatch.check` is called at the program's logging cadence with the step's host-side scalars
(no extra synchronisation with the device). It calls `cmd.diagnose_collapse` on the teacher's
per-sample entropy ``H(P_t)`` and batch-mean entropy ``H(mean_b P_t)``; the first time a kind is
seen it prints a warning naming it and the remedies. Under torch.distributed the two entropies are
averaged over the processes first, so every process reaches the same verdict (and stops together).

Example:
    >>> import math
    >>> watch = CollapseWatch(out_dim=128, stop=False, verbose=False)
    >>> watch.check({"teacher_entropy": math.log(128), "teacher_batch_entropy": math.log(128)}, step=10)
    'uniform'
    >>> watch.epoch_kind, watch.seen
    ('uniform', {'uniform': 10})
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

from cmd.cli.exit_status import COLLAPSE

__all__ = ["COLLAPSE_EXIT_STATUS", "CollapseStop", "CollapseWatch", "collapse_message"]

COLLAPSE_EXIT_STATUS = COLLAPSE  # see cmd.cli.exit_status

_REMEDIES = {
    "uniform": (
        "lower the teacher temperature (--teacher_temp, --warmup_teacher_temp), raise the center momentum "
        "(--center_momentum), or lower the learning rate (--lr)"
    ),
    "one_hot": (
        "lower the center momentum (--center_momentum), use --centering sinkhorn, add BatchNorm to the heads "
        "(--head_bn true), or lower the learning rate (--lr)"
    ),
}
_WHAT = {
    "uniform": "uniform collapse: the teacher gives every image a near-uniform distribution over the K prototypes",
    "one_hot": "one-hot collapse: the teacher puts every image on the same few prototypes",
}


class CollapseStop(RuntimeError):
    """The teacher collapsed under ``--stop_on_collapse``; the checkpoint was saved (exit status 3)."""


def collapse_message(kind: str, step: int, entropy: float, batch_entropy: float, out_dim: int) -> str:
    """The warning for collapse ``kind`` ("uniform" | "one_hot") with the entropies and the remedies."""
    return (f"warning: step {step}: {_WHAT[kind]} (teacher entropy {entropy:.3f}, batch-mean entropy "
            f"{batch_entropy:.3f}, log K = {math.log(out_dim):.3f}). Remedies: {_REMEDIES[kind]}.")


class CollapseWatch:
    """Watches the teacher's entropies at the logging cadence (see the module docstring).

    Attributes:
        seen: ``{kind: first step}`` of every kind diagnosed so far in this run.
        epoch_kind: the first kind diagnosed in the current epoch (`new_epoch` resets it), or None.
        stop_requested: True once a collapse was diagnosed with ``stop=True``.
    """

    def __init__(self, out_dim: int, *, stop: bool, verbose: bool, reduce_mean=None) -> None:
        self.out_dim, self.stop, self.verbose, self.reduce_mean = out_dim, stop, verbose, reduce_mean
        self.seen: dict[str, int] = {}
        self.epoch_kind: str | None = None
        self.stop_requested = False
        self.last: tuple[str, int] | None = None

    def new_epoch(self) -> None:
        self.epoch_kind = None

    def check(self, scalars: Mapping[str, float], step: int) -> str | None:
        """The diagnosis of this step's entropies (None when healthy or when they are not computed)."""
        h, hb = scalars.get("teacher_entropy"), scalars.get("teacher_batch_entropy")
        if h is None or hb is None:
            return None
        if self.reduce_mean is not None:
            h, hb = self.reduce_mean(h, hb)
        if not (math.isfinite(h) and math.isfinite(hb)):
            return None
        import cmd

        kind = cmd.diagnose_collapse(h, hb, self.out_dim)
        if kind is None:
            return None
        self.epoch_kind = self.epoch_kind or kind
        self.last = (kind, step)
        if kind not in self.seen:
            self.seen[kind] = step
            if self.verbose:
                print(collapse_message(kind, step, h, hb, self.out_dim), file=sys.stderr, flush=True)
        if self.stop:
            self.stop_requested = True
        return kind
