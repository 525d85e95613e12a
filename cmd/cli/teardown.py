"""Tearing a run down in order on every exit path: data-loading workers first, then the process group.

The training program's data-loading workers ignore SIGTERM / SIGINT (`ignore_termination_signals`),
so that a signal sent to the whole process group (``timeout``, SLURM, container runtimes) reaches
the main process, which finishes its step and saves, instead of killing the workers under it. The
price: Python's exit handler stops a worker that is still alive with SIGTERM and then waits for it,
forever. After an error (e.g. an unreadable image raised from a worker) the loader's iterator may
not have shut its workers down, and the process would hang at exit. Hence:

- `close_loader`: shut a loader's persistent workers down (the normal end of a run);
- `kill_loader_workers`: SIGKILL a loader's workers still alive (an error exit; they hold no state
  worth keeping: the main process already saved what it could);
- `install_exit_hook`: `kill_loader_workers` (every daemonic child) at interpreter exit, before
  ``multiprocessing`` waits for its children: the way out after an error anywhere else (e.g. in
  the k-NN monitor's loaders, whose iterators live inside `cmd.extract_features`);
- `finish_distributed`: on a clean exit, every process waits for the others (a barrier), then the
  process group is destroyed; after an error it is destroyed without waiting.

Example:
    >>> from cmd.cli.teardown import kill_loader_workers
    >>> kill_loader_workers()  # no DataLoader worker alive: nothing to do
    0
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from typing import Any

__all__ = ["close_loader", "finish_distributed", "ignore_termination_signals", "install_exit_hook",
           "kill_loader_workers"]

_HOOK = {"installed": False}


def ignore_termination_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM / SIGINT.

    ``timeout``, SLURM and container runtimes signal the whole process group: the main process then
    saves a checkpoint and exits (its workers shut down with it) instead of dying with its workers.
    The main process must then stop its workers itself on an error (`install_exit_hook`).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def kill_loader_workers(loader: Any = None, timeout: float = 5.0) -> int:
    """SIGKILL DataLoader workers still alive; returns how many.

    With ``loader`` (a DataLoader or its iterator): the workers of that iterator. Without: every
    daemonic child process (at interpreter exit: Python's own exit handler stops daemonic children
    with SIGTERM, which the workers ignore; this does the same with SIGKILL; a started
    `multiprocessing.Process` no longer holds its target, so DataLoader workers are recognised as
    what torch makes them, daemonic children). The SIGCHLD handler torch installs would report the
    killed workers as an error: the loader's worker pids are unregistered from it first; at exit
    (no ``loader``) the handler is reset.
    """
    iterator = _iterator_of(loader) if loader is not None else None
    if loader is not None:
        candidates = list(getattr(iterator, "_workers", None) or [])
    else:
        candidates = multiprocessing.active_children()
    workers = [p for p in candidates if p.daemon and p.is_alive()]
    if not workers:
        return 0
    if iterator is not None:
        if getattr(iterator, "_worker_pids_set", False):
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
    else:
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        except ValueError:  # not the main thread
            pass
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout)
    return len(workers)


def install_exit_hook() -> None:
    """Register `kill_loader_workers` to run at exit before ``multiprocessing`` joins its children (once)."""
    if not _HOOK["installed"]:
        import multiprocessing.util  # noqa: F401  (its exit handler is registered first, so it runs after ours)

        atexit.register(kill_loader_workers, None)
        _HOOK["installed"] = True


def _iterator_of(loader: Any) -> Any:
    """The worker-holding iterator: ``loader`` itself when it is one (``iter(DataLoader)``), else its persistent one."""
    return loader if hasattr(loader, "_shutdown_workers") else getattr(loader, "_iterator", None)


def close_loader(loader: Any) -> None:
    """Shut down the workers of a `torch.utils.data.DataLoader` or of its iterator (no-op without workers)."""
    iterator = _iterator_of(loader)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def finish_distributed(*, clean: bool) -> None:
    """Destroy the default process group, after a barrier when ``clean`` (no-op outside torch.distributed).

    The barrier makes every process leave together: none tears its communication threads down while
    another still talks to it. After an error the other processes may never arrive: no barrier.
    """
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    try:
        if clean:
            torch_dist.barrier()
    except RuntimeError:  # another process failed and left: its own error is what counts
        pass
    finally:
        torch_dist.destroy_process_group()
