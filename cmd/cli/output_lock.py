"""An exclusive lock on a run's output folder, so that two runs never write one checkpoint and log.

``fcntl.flock`` on ``output_dir/.lock``: the kernel releases it when the process exits, however it
exits (a crash or ``kill -9`` included), so a stale lock never blocks a later run. The holder writes
its pid, host and start time into the file, and a refused run names them.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d, OutputLock(d):
    ...     pass
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

try:  # POSIX; on other systems the lock is a no-op
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputLock", "OutputLockedError"]


class OutputLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


class OutputLock:
    """Hold ``folder/.lock`` exclusively from `acquire` (or ``with``) until `release` or process exit.

    Args:
        folder: the output folder (must exist).

    Raises:
        OutputLockedError: (from `acquire`) another process holds it; the message names its pid and host.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise OutputLockedError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, "
                "or choose another --output_dir"
            ) from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
