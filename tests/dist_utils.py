"""Run a function in several gloo processes on the CPU (for the distributed tests).

Example::

    def _check(rank, world_size, x):
        ...
        return value  # any object torch.save can store

    results = run_distributed(_check, 2, x)   # [value of rank 0, value of rank 1]

``fn`` must be defined at module level of an importable module (spawned processes import it).
A failure in any process is re-raised in the parent with that process's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from cmd.cli.teardown import finish_distributed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120)
    )
    clean = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        clean = True
    finally:
        # as the program leaves: a barrier first on success, so that no process tears gloo's threads
        # down while the other still talks to it (that aborted a rank with "terminate called ...")
        finish_distributed(clean=clean)


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes; return results by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=True)
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)
        ]
