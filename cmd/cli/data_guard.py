"""A training loader whose loading errors end the epoch's loop instead of unwinding the program.

An image that cannot be read in the middle of an epoch (a truncated or 0-byte file) raises from the
loader. `GuardedBatches` stops the iteration there and keeps the error, so that the program can
save a checkpoint of the steps already done in that epoch, as for a signal, and then exit with
`DataLoadError`: one line naming the file (a worker's error arrives as a traceback; its last line
is kept).

Example:
    >>> batches = GuardedBatches(iter([1, 2]))
    >>> list(batches), batches.error
    ([1, 2], None)
    >>> def broken():
    ...     yield 1
    ...     raise OSError("cannot read image a.jpg: truncated")
    >>> batches = GuardedBatches(broken())
    >>> list(batches), str(batches.error)
    ([1], 'cannot read image a.jpg: truncated')
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["DataLoadError", "GuardedBatches", "loader_error_line"]


class DataLoadError(RuntimeError):
    """A batch of the training set could not be loaded (exit status 1, after saving the epoch's steps)."""


def loader_error_line(err: BaseException) -> str:
    """The error as one line: for an error re-raised from a DataLoader worker, its traceback's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else text
        kind, sep, rest = last.partition(": ")
        text = rest if sep and kind.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(text.split())


class GuardedBatches:
    """Iterates over ``batches``; a loading error stops the iteration and is kept in ``error``.

    Attributes:
        error: a `DataLoadError` (one line, the original error as its cause), or None.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = batches
        self.error: DataLoadError | None = None

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001  (any loading error ends the epoch and is reported)
                self.error = DataLoadError(loader_error_line(err))
                self.error.__cause__ = err
                return
            yield batch
