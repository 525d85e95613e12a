"""The EMA teacher: ``teacher <- m * teacher + (1 - m) * student`` after every step (DINO / EsViT / CMD).

Parameters are matched **by name** (not by position) with shape and dtype checks, wrappers (DDP,
DataParallel, ``torch.compile``) are removed on both sides, buffers (BatchNorm statistics) are copied,
and all parameters are updated by one fused ``torch._foreach_lerp_`` call instead of a Python loop of
small kernels (on an H200, Swin-T + heads: 4.2 ms per step for the loop, 0.52 ms fused).

Example:
    >>> import torch
    >>> student = torch.nn.Linear(4, 2)
    >>> ema = EMATeacher(student, momentum=0.996, total_steps=1000)
    >>> ema.update(student)  # after optimizer.step()
    0.996
    >>> ema.step, ema.teacher.weight.requires_grad
    (1, False)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cmd._unwrap import unwrap_model
from cmd.schedules import cosine_value

__all__ = ["EMATeacher", "disable_stochastic_depth", "update_teacher"]

_MAX_LISTED = 20


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def _check_momentum(momentum: float, name: str = "momentum") -> float:
    if isinstance(momentum, torch.Tensor):
        raise TypeError(f"{name} must be a Python float (a tensor would force a host sync), got a tensor")
    momentum = float(momentum)
    if not (math.isfinite(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {momentum}")
    return momentum


def _paired(
    teacher: Mapping[str, torch.Tensor], student: Mapping[str, torch.Tensor], kind: str
) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Names, teacher tensors and student tensors paired by name; raises listing every mismatch."""
    missing = [n for n in student if n not in teacher]
    extra = [n for n in teacher if n not in student]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"in the student but not the teacher: {_listing(missing)}")
        if extra:
            parts.append(f"in the teacher but not the student: {_listing(extra)}")
        raise ValueError(f"teacher and student {kind} differ by name; " + "; ".join(parts))
    bad_shape = [
        f"{n} (teacher {tuple(t.shape)}, student {tuple(student[n].shape)})"
        for n, t in teacher.items()
        if t.shape != student[n].shape
    ]
    if bad_shape:
        raise ValueError(f"teacher and student {kind} differ in shape: {_listing(bad_shape)}")
    names = list(teacher)
    return names, [teacher[n] for n in names], [student[n] for n in names]


def _check_finite(names: list[str], params: list[torch.Tensor]) -> None:
    """Raise FloatingPointError naming the parameters that hold NaN or Inf.

    Fused ``torch._foreach_norm`` calls (2-norms, accumulated in float32 for float16/bfloat16) over all
    floating-point tensors, then one device-to-host read of a single bool. A norm is non-finite
    whenever a value is; only then (or when a huge but finite tensor overflows its norm) are the
    tensors checked one by one.
    """
    floating = [(n, p) for n, p in zip(names, params) if p.is_floating_point() or p.is_complex()]
    half = [p for _, p in floating if p.dtype in (torch.float16, torch.bfloat16)]
    other = [p for _, p in floating if p.dtype not in (torch.float16, torch.bfloat16)]
    norms = list(torch._foreach_norm(half, 2, dtype=torch.float32)) if half else []
    norms += list(torch._foreach_norm(other, 2)) if other else []
    if not norms or bool(torch.isfinite(torch.stack([v.float() for v in norms])).all()):
        return
    bad = [n for n, p in floating if not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(
            f"the student has non-finite parameters or buffers (NaN or Inf): {_listing(bad)}; the teacher was "
            "not updated. The training step diverged: lower the learning rate, clip gradients or check the "
            "loss/inputs"
        )


# stochastic-depth modules: class name -> the attribute holding the drop probability
# (timm's DropPath, torchvision's StochasticDepth); matched by name so that neither is imported here
_STOCHASTIC_DEPTH = {"DropPath": "drop_prob", "StochasticDepth": "p"}


def disable_stochastic_depth(module: nn.Module) -> int:
    """Set the drop probability of every stochastic-depth module in ``module`` to 0, in place.

    Stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``; ``drop_path_rate`` of
    timm's ViTs and Swins) drops whole residual branches at random in train mode. The official CMD
    code (EsViT's) builds its teacher with ``drop_path_rate=0``: ``models/swin_transformer.py:962``
    (``0.0 if is_teacher``) for Swin, ``main_esvit.py:310-315`` (student 0.1, teacher the default 0)
    for ViTs, as DINO does; so the teacher's targets are deterministic. Dropout (``drop_rate``,
    ``attn_drop_rate``) is left as it is: the official code gives the teacher the student's value.
    Returns the number of modules changed.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, drop_path_rate=0.1)
        >>> disable_stochastic_depth(vit)  # blocks 1 and 2 (block 0's rate is 0: no DropPath module)
        4
    """
    changed = 0
    for sub in module.modules():
        attribute = _STOCHASTIC_DEPTH.get(type(sub).__name__)
        if attribute is not None and isinstance(getattr(sub, attribute, None), float | int):
            if getattr(sub, attribute) != 0:
                changed += 1
            setattr(sub, attribute, 0.0)
    return changed


@torch.no_grad()
def update_teacher(
    teacher: nn.Module, student: nn.Module, momentum: float, *, check_finite: bool = True
) -> None:
    """Move ``teacher`` towards ``student`` in place: ``t <- m * t + (1 - m) * s`` for every parameter.

    Parameters are matched by name (``named_parameters``) with shape checks; buffers (BatchNorm
    running statistics, ...) are copied from the student. DDP / DataParallel / ``torch.compile``
    wrappers around either module are removed first. All parameters are updated by one
    ``torch._foreach_lerp_`` (``t + (1 - m) * (s - t)``), all buffers by one ``torch._foreach_copy_``.

    With ``check_finite`` (the default) the student's parameters are checked first, so that a NaN or
    Inf never reaches the teacher: fused ``torch._foreach_norm`` calls over them (a read of the
    weights, about half the cost of the lerp: 12 ms vs 23 ms for ViT-S/16 on one CPU thread) and one
    device-to-host sync for a single bool (on a GPU the host waits for the step's kernels to finish).
    ``check_finite=False`` skips it: then nothing is synchronised with the host.

    Args:
        teacher: the EMA module (same architecture as the student).
        student: the trained module, possibly wrapped.
        momentum: m in [0, 1] as a Python float; 1 keeps the teacher, 0 copies the student.
        check_finite: refuse a student with NaN/Inf parameters (one host sync; see above).

    Raises:
        FloatingPointError: ``check_finite`` and a student parameter holds NaN or Inf (the parameters are
            named; the teacher is left unchanged).
        ValueError: names or shapes differ (every mismatched name is listed), or momentum is outside [0, 1].
        TypeError: a parameter's dtype differs between teacher and student.

    Example:
        >>> import copy, torch
        >>> s = torch.nn.Linear(3, 1); t = copy.deepcopy(s)
        >>> with torch.no_grad(): _ = s.weight.add_(1.0)
        >>> update_teacher(t, s, momentum=0.9)
        >>> torch.allclose(t.weight, s.weight - 0.9)
        True
    """
    momentum = _check_momentum(momentum)
    teacher, student = unwrap_model(teacher), unwrap_model(student)
    if teacher is student:
        raise ValueError("teacher and student are the same module; the teacher must be a separate copy")
    names, t_params, s_params = _paired(
        dict(teacher.named_parameters()), dict(student.named_parameters()), "parameters"
    )
    bad_dtype = [
        f"{n} (teacher {t.dtype}, student {s.dtype})"
        for n, t, s in zip(names, t_params, s_params)
        if t.dtype != s.dtype
    ]
    if bad_dtype:
        raise TypeError(f"teacher and student parameters differ in dtype: {_listing(bad_dtype)}")
    buf_names, t_bufs, s_bufs = _paired(dict(teacher.named_buffers()), dict(student.named_buffers()), "buffers")
    if check_finite:
        checked = (names, s_params) if momentum != 1.0 else ([], [])
        _check_finite(checked[0] + buf_names, checked[1] + s_bufs)

    if t_params and momentum != 1.0:
        # lerp_(t, s, w) = t + w * (s - t) = m * t + (1 - m) * s with w = 1 - m.
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    if t_bufs:
        torch._foreach_copy_(t_bufs, s_bufs)


class EMATeacher:
    """An exponential-moving-average teacher of a student network, with DINO's cosine momentum schedule.

    The teacher is a deep copy of the (unwrapped) student whose parameters do not require gradients,
    **without stochastic depth**: every drop-path module of the copy gets drop probability 0
    (`disable_stochastic_depth`), as DINO and EsViT build their teacher with ``drop_path_rate=0``, so
    two teacher forwards of the same input agree also in train mode; the weights are the student's,
    and dropout (if any) is kept. Its training mode is independent of the student's (it starts as the student's at copy time; call
    ``ema.teacher.eval()`` or ``.train()`` as your recipe needs). Move it with ``ema.teacher.to(...)``.

    With ``total_steps`` the momentum follows ``m(step) = final - (final - m0) * (cos(pi * step /
    total_steps) + 1) / 2``, i.e. ``cosine_schedule(momentum, final_momentum, 1, total_steps)[step]``
    (0.996 -> 1 over the run in DINO / CMD), and stays at ``final_momentum`` past ``total_steps``.
    Without it the momentum is constant. An internal step counter (``ema.step``) advances on every
    [`update`][cmd.teacher.EMATeacher.update]; it is part of [`state_dict`][cmd.teacher.EMATeacher.state_dict], so a resumed run continues the schedule exactly.

    Args:
        student: the network to follow (may be wrapped in DDP or ``torch.compile``).
        momentum: the (initial) momentum m0 in [0, 1].
        final_momentum: the momentum at the end of the schedule (used only with ``total_steps``).
        total_steps: the number of updates of the whole run (epochs x iterations per epoch), or None
            for a constant momentum.
        check_finite: `update` refuses (FloatingPointError naming them) student parameters or
            buffers holding NaN/Inf, so they never reach the teacher; costs fused norms and one
            host sync per update (see `update_teacher`). False skips the check.

    Example:
        >>> import torch
        >>> student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> ema = EMATeacher(student, total_steps=10)
        >>> round(ema.momentum_at(5), 4), ema.momentum_at(10)
        (0.998, 1.0)
        >>> out = ema(torch.randn(8, 4))  # runs the teacher: [8, 4]
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        total_steps: int | None = None,
        check_finite: bool = True,
    ) -> None:
        self.check_finite = bool(check_finite)
        self.momentum = _check_momentum(momentum, "momentum")
        self.final_momentum = _check_momentum(final_momentum, "final_momentum")
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"total_steps must be a positive int or None, got {total_steps!r}")
        self.total_steps = total_steps
        self.step = 0
        self.teacher: nn.Module = copy.deepcopy(unwrap_model(student))
        self.teacher.requires_grad_(False)
        disable_stochastic_depth(self.teacher)  # the teacher's targets are deterministic (DINO, EsViT)

    def momentum_at(self, step: int) -> float:
        """The momentum the schedule gives at update ``step`` (constant without ``total_steps``)."""
        if self.total_steps is None:
            return self.momentum
        return cosine_value(self.momentum, self.final_momentum, step, self.total_steps)

    def update(self, student: nn.Module, momentum: float | None = None) -> float:
        """Move the teacher towards ``student`` (call after ``optimizer.step()``); returns the momentum used.

        Args:
            student: the trained network (same architecture; wrappers are removed).
            momentum: overrides the schedule for this update; the step counter advances anyway.

        Raises:
            FloatingPointError: ``check_finite`` and the student holds NaN/Inf (named); neither the teacher
                nor the step counter changes.
        """
        m = self.momentum_at(self.step) if momentum is None else _check_momentum(momentum)
        update_teacher(self.teacher, student, m, check_finite=self.check_finite)
        self.step += 1
        return m

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher network (``ema(x) == ema.teacher(x)``)."""
        return self.teacher(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """The schedule state (like an lr scheduler's): step counter and momentum settings.

        The teacher's weights are ``ema.teacher.state_dict()``; [`cmd.save_checkpoint`][cmd.checkpoint.save_checkpoint] stores both
        when given the ``EMATeacher`` itself.
        """
        return {
            "step": self.step,
            "momentum": self.momentum,
            "final_momentum": self.final_momentum,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step counter and momentum settings saved by [`state_dict`][cmd.teacher.EMATeacher.state_dict]."""
        unknown = sorted(set(state) - {"step", "momentum", "final_momentum", "total_steps"})
        if unknown or "step" not in state:
            raise ValueError(
                f"not an EMATeacher state: expected keys step, momentum, final_momentum, total_steps; "
                f"got {sorted(state)}"
            )
        self.step = int(state["step"])
        self.momentum = _check_momentum(state.get("momentum", self.momentum), "momentum")
        self.final_momentum = _check_momentum(
            state.get("final_momentum", self.final_momentum), "final_momentum"
        )
        total = state.get("total_steps", self.total_steps)
        self.total_steps = None if total is None else int(total)

    def __repr__(self) -> str:
        return (
            f"EMATeacher(teacher={type(self.teacher).__name__}, step={self.step}, momentum={self.momentum}, "
            f"final_momentum={self.final_momentum}, total_steps={self.total_steps})"
        )
