"""Training schedules: DINO's per-iteration cosine schedule, the epoch-indexed teacher temperature, lr scaling.

All values follow ``method.md`` section 4 exactly (the definitions of DINO / EsViT), so a run of this
library and one of the official code see the same learning rate, weight decay and momentum at every
iteration.

Example:
    >>> lr = cosine_schedule(scale_lr(5e-4, 256), 1e-6, epochs=300, iters_per_epoch=20, warmup_epochs=10)
    >>> lr.shape, float(lr[200])
    ((6000,), 0.0005)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

__all__ = ["cosine_schedule", "cosine_value", "teacher_temperature_schedule", "EpochSchedule", "scale_lr"]


def _check_count(name: str, value: int, *, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values: linear warm-up, then a half cosine from ``base`` towards ``final`` (DINO).

    With ``W = warmup_epochs * iters_per_epoch`` warm-up iterations and ``n = epochs * iters_per_epoch - W``
    remaining ones, the schedule is ``linspace(start_warmup_value, base, W)`` followed by
    ``final + 0.5 * (base - final) * (1 + cos(pi * i / n))`` for ``i = 0 .. n - 1``. The last value is
    therefore close to, not equal to, ``final`` (as in DINO / EsViT).

    Args:
        base: the value at the end of the warm-up (the peak learning rate, or the start of a momentum
            or weight-decay schedule).
        final: the value the cosine tends to.
        epochs: number of epochs (>= 1).
        iters_per_epoch: optimisation steps per epoch (>= 1).
        warmup_epochs: epochs of linear warm-up, ``0 <= warmup_epochs <= epochs``.
        start_warmup_value: the first warm-up value.

    Returns:
        float64 array of shape [epochs * iters_per_epoch]; index it with the global iteration.

    Example:
        >>> s = cosine_schedule(1e-3, 1e-6, epochs=10, iters_per_epoch=5, warmup_epochs=2)
        >>> round(float(s[1]), 12), float(s[10]), round(float(s[49]), 12)
        (0.000111111111, 0.001, 2.539792e-06)
    """
    epochs = _check_count("epochs", epochs, minimum=1)
    iters_per_epoch = _check_count("iters_per_epoch", iters_per_epoch, minimum=1)
    warmup_epochs = _check_count("warmup_epochs", warmup_epochs, minimum=0)
    if warmup_epochs > epochs:
        raise ValueError(f"warmup_epochs must be <= epochs ({epochs}), got {warmup_epochs}")
    warmup_iters = warmup_epochs * iters_per_epoch
    total = epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base, warmup_iters, dtype=np.float64)
    n = total - warmup_iters
    i = np.arange(n, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    schedule = np.concatenate([warmup, cosine])
    assert schedule.shape == (total,)
    return schedule


def cosine_value(base: float, final: float, step: int, total_steps: int) -> float:
    """One value of a warm-up-free cosine schedule: ``cosine_schedule(base, final, 1, total_steps)[step]``.

    Steps at or past ``total_steps`` give ``final`` (the schedule has ended), so a run that goes on
    longer than planned stays well defined.

    Example:
        >>> cosine_value(0.996, 1.0, 0, 100), cosine_value(0.996, 1.0, 100, 100)
        (0.996, 1.0)
    """
    step = _check_count("step", step, minimum=0)
    total_steps = _check_count("total_steps", total_steps, minimum=1)
    if step >= total_steps:
        return float(final)
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * step / total_steps)))


class EpochSchedule(Sequence[float]):
    """A per-epoch schedule indexed by epoch that is safe past its end (it holds its last value).

    It behaves like the numpy array it wraps (``len``, iteration, slicing, ``np.asarray``), except that
    an integer index at or past the end returns the last value instead of raising.

    Example:
        >>> s = EpochSchedule([0.04, 0.055, 0.07])
        >>> s[1], s[10], len(s)
        (0.055, 0.07, 3)
    """

    def __init__(self, values: Sequence[float] | np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        if self.values.ndim != 1 or self.values.size == 0:
            raise ValueError(f"values must be a non-empty 1-D sequence, got shape {self.values.shape}")

    @overload
    def __getitem__(self, epoch: int) -> float: ...

    @overload
    def __getitem__(self, epoch: slice) -> np.ndarray: ...

    def __getitem__(self, epoch):
        if isinstance(epoch, slice):
            return self.values[epoch]
        try:
            epoch = operator.index(epoch)
        except TypeError:
            raise TypeError(f"epoch must be an integer; got {epoch!r} ({type(epoch).__name__})") from None
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        if epoch >= len(self.values):
            return float(self.values[-1])
        return float(self.values[epoch])

    def __call__(self, epoch: int) -> float:
        """The value at ``epoch`` (same as ``schedule[epoch]``)."""
        return self[epoch]

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[float]:
        return (float(v) for v in self.values)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.values.astype(dtype) if dtype is not None else self.values.copy()

    def __repr__(self) -> str:
        return f"EpochSchedule({self.values.tolist()!r})"


def teacher_temperature_schedule(warmup: float, final: float, warmup_epochs: int) -> EpochSchedule:
    """The teacher temperature per epoch: ``linspace(warmup, final, warmup_epochs)``, then ``final``.

    DINO's table ``concatenate(linspace(warmup, final, warmup_epochs), ones(n_epochs - warmup_epochs) *
    final)`` at every epoch where DINO defines it, and ``final`` past it: the result is indexed by
    epoch and holds ``final`` for every later epoch, so it needs no run length (a run shorter than
    the warm-up simply ends on the ramp; DINO refuses that case). This one schedule is used by the
    losses (``CMDLoss.teacher_temperature``) and by training loops alike.

    Args:
        warmup: the temperature at epoch 0 (e.g. 0.04).
        final: the temperature after the warm-up (e.g. 0.07).
        warmup_epochs: epochs of linear warm-up (>= 0; 0: ``final`` from the start).

    Returns:
        An `EpochSchedule` of length ``warmup_epochs + 1`` (``schedule[epoch]`` or
        ``schedule(epoch)``, any epoch >= 0).

    Example:
        >>> t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=30)
        >>> t[0], round(t[15], 6), t[29], t[299], t[1000]
        (0.04, 0.055517, 0.07, 0.07, 0.07)
    """
    warmup_epochs = _check_count("warmup_epochs", warmup_epochs, minimum=0)
    for name, value in (("warmup", warmup), ("final", final)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite temperature, got {value!r}")
    # the ramp, then one ``final`` that every later epoch repeats (linspace(a, b, 1) == [a], as in DINO)
    return EpochSchedule(np.append(np.linspace(warmup, final, warmup_epochs, dtype=np.float64), float(final)))


def scale_lr(base_lr: float, total_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule: ``base_lr * total_batch / reference_batch`` (DINO, EsViT).

    ``total_batch`` is the batch over all processes (per-process batch x world size).

    Example:
        >>> scale_lr(5e-4, 512)
        0.001
    """
    total_batch = _check_count("total_batch", total_batch, minimum=1)
    reference_batch = _check_count("reference_batch", reference_batch, minimum=1)
    if not math.isfinite(base_lr) or base_lr < 0:
        raise ValueError(f"base_lr must be a finite non-negative number, got {base_lr!r}")
    return float(base_lr) * total_batch / reference_batch
