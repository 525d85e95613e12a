"""The exit statuses of ``cmd-fgvc pretrain``: 0 only for a finished run.

====  ========================================================================================
0     finished: every ``--epochs`` trained (or nothing left to train)
1     error: bad input, unreadable data or checkpoint, a failed write (a full disk)
2     non-finite loss or gradients: stopped, the last good checkpoint kept (argparse's usage
      errors also exit 2, before anything runs)
3     the teacher collapsed under ``--stop_on_collapse``: checkpoint saved
75    interrupted, resumable: SIGTERM / SIGINT or ``--max_steps``; a checkpoint was saved and
      rerunning the same command resumes (``EX_TEMPFAIL`` of sysexits.h, "temporary failure,
      retry": batch schedulers can requeue on it, e.g. SLURM ``RequeueExit=75`` in slurm.conf,
      LSF ``bsub -Q 75``; or in a job script ``[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID``)
====  ========================================================================================

So ``cmd-fgvc pretrain ... && cmd-fgvc evaluate ...`` evaluates only a finished run. Under
``torchrun`` each process exits with its status and torchrun itself reports any non-zero one as a
failure (its own exit status is then 1).

Example:
    >>> pretrain_status({"interrupted": True})
    75
    >>> pretrain_status({"interrupted": False})
    0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["COLLAPSE", "ERROR", "EXIT_STATUS_EPILOG", "FINISHED", "INTERRUPTED", "NON_FINITE", "pretrain_status"]

FINISHED = 0
ERROR = 1
NON_FINITE = 2
COLLAPSE = 3
INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h)

EXIT_STATUS_EPILOG = (
    "exit status: 0 finished; 1 error (bad input, unreadable data, a failed write); 2 non-finite loss "
    "(the last good checkpoint kept); 3 collapse under --stop_on_collapse (checkpoint saved); 75 interrupted "
    "by SIGTERM/SIGINT or --max_steps, checkpoint saved, rerun the same command to resume (EX_TEMPFAIL: "
    "requeue on it, e.g. SLURM RequeueExit=75, LSF bsub -Q 75)"
)


def pretrain_status(result: Mapping[str, Any] | None) -> int:
    """The exit status of a `cmd.cli.pretrain.main` that returned ``result``: `INTERRUPTED` or `FINISHED`."""
    return INTERRUPTED if result and result.get("interrupted") else FINISHED
