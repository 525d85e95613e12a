"""Mixed precision: bf16 autocast where the device supports it, fp16 autocast with loss scaling otherwise.

bf16 has fp32's exponent range, so gradients neither underflow nor overflow and no loss scaling is
needed; fp16 (GPUs before Ampere) needs a `torch.amp.GradScaler`. [`mixed_precision`][cmd.amp.mixed_precision]
picks for you, and [`MixedPrecision`][cmd.amp.MixedPrecision] bundles the choice: ``autocast()`` for the forward pass and
``scaler`` for the backward pass. The scaler is always a ``GradScaler``, disabled (a pass-through)
unless the mode is fp16, so one training loop serves every mode. The library's losses compute their
softmaxes in float32 whatever the autocast dtype.

Typical step (the order matters: unscale before clipping, clip before the step)::

    mp = mixed_precision("cuda")             # "auto": bf16 on Ampere and newer, fp16 + scaling before
    with mp.autocast():
        loss = criterion(student(crops), teacher(crops[:2]), epoch).loss
    optimizer.zero_grad(set_to_none=True)
    mp.backward(loss)                        # scaler.scale(loss).backward()
    mp.unscale_(optimizer)                   # no-op unless fp16
    clip_gradients(student, 3.0)
    mp.step(optimizer)                       # scaler.step + scaler.update; skips overflowed fp16 steps

Save ``mp.scaler`` with the checkpoint (``save_checkpoint(..., scaler=mp.scaler)``) and restore it
with ``restore_checkpoint(..., scaler=mp.scaler)``.

Example:
    >>> mp = mixed_precision("cpu")
    >>> mp.mode, mp.scaler.is_enabled()
    ('off', False)
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

__all__ = ["MixedPrecision", "mixed_precision", "Mode"]

Mode = Literal["auto", "bf16", "fp16", "off"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


class MixedPrecision:
    """A resolved mixed-precision setting: ``mode`` in {"bf16", "fp16", "off"} on one device type.

    Args:
        mode: "bf16" (autocast to bfloat16, no loss scaling), "fp16" (autocast to float16 with a
            ``GradScaler``) or "off" (float32). Use [`mixed_precision`][cmd.amp.mixed_precision] for "auto".
        device_type: the device type autocast applies to ("cuda", "cpu", ...).

    Attributes:
        mode, device_type: as given.
        dtype: torch.bfloat16, torch.float16 or None ("off").
        scaler: a ``torch.amp.GradScaler``, enabled only for fp16.

    Example:
        >>> import torch
        >>> mp = MixedPrecision("bf16", "cpu")
        >>> with mp.autocast():
        ...     y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
        >>> y.dtype
        torch.bfloat16
    """

    def __init__(self, mode: Literal["bf16", "fp16", "off"], device_type: str = "cuda") -> None:
        if mode not in _DTYPES:
            raise ValueError(
                f"mode must be one of 'bf16', 'fp16', 'off' (or 'auto' via mixed_precision), got {mode!r}"
            )
        device_type = torch.device(device_type).type
        if mode != "off" and not torch.amp.is_autocast_available(device_type):
            raise ValueError(f"autocast is not available for device type {device_type!r}; use mode='off'")
        self.mode = mode
        self.device_type = device_type
        self.dtype: torch.dtype | None = _DTYPES[mode]
        self.scaler = torch.amp.GradScaler(device_type, enabled=mode == "fp16")

    @property
    def enabled(self) -> bool:
        """True unless the mode is "off"."""
        return self.dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """A context manager running its body under autocast to ``dtype`` (a no-op when "off")."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled first under fp16."""
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale (fp16 only; call before clipping). At most once per step."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 skipped when gradients overflowed, then the scale is updated."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def __repr__(self) -> str:
        return f"MixedPrecision(mode={self.mode!r}, device_type={self.device_type!r})"


def bf16_supported(device_type: str) -> bool:
    """Whether bf16 autocast is worth using on ``device_type`` (CUDA with native bf16: Ampere or newer)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def _device_type(device: str | torch.device) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"{device!r} is neither a mode ('auto', 'bf16', 'fp16', 'off') nor a torch device such as 'cuda'"
        ) from e


def mixed_precision(
    *settings: str | torch.device | None,
    device: str | torch.device | None = None,
    mode: Mode | None = None,
) -> MixedPrecision:
    """Choose the mixed-precision setting for a device.

    Give the device and / or the mode by keyword or positionally, in either order: a mode name
    ("auto", "bf16", "fp16", "off") is the mode and anything else the device, so
    ``mixed_precision("cuda")``, ``mixed_precision("cuda", "bf16")``, ``mixed_precision("bf16")`` and
    ``mixed_precision("auto", device="cpu")`` all read as they look.

    ``mode="auto"`` (the default) gives:

    - CUDA with native bf16 (Ampere, Hopper, ...): "bf16" autocast, no loss scaling;
    - CUDA without it (Volta, Turing): "fp16" autocast with a ``GradScaler``;
    - any other device (CPU, MPS, ...): "off". CPU autocast is supported but seldom faster and changes
      numerics, so ask for it explicitly with ``mode="bf16"`` if you want it.

    An explicit "bf16", "fp16" or "off" is used as given.

    Args:
        *settings: up to two positional values, the device and / or the mode.
        device: the training device (a ``torch.device`` or a string such as "cuda:0"); default CUDA
            when available, else CPU.
        mode: "auto", "bf16", "fp16" or "off".

    Example:
        >>> mixed_precision("cpu").mode, mixed_precision("bf16", device="cpu").dtype
        ('off', torch.bfloat16)
    """
    if len(settings) > 2:
        raise TypeError(f"mixed_precision takes at most a device and a mode, got {len(settings)} values")
    for value in settings:
        if value is None:
            continue
        if isinstance(value, str) and value in ("auto", *_DTYPES):
            if mode is not None:
                raise ValueError(f"mixed_precision got two modes: {mode!r} and {value!r}")
            mode = value  # type: ignore[assignment]
        else:
            _device_type(value)  # a clear error for a misspelt mode
            if device is not None:
                raise ValueError(f"mixed_precision got two devices: {device!r} and {value!r}")
            device = value
    mode = "auto" if mode is None else mode
    if mode != "auto" and mode not in _DTYPES:
        raise ValueError(f"mode must be one of 'auto', 'bf16', 'fp16', 'off', got {mode!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = _device_type(device)
    if mode == "auto":
        if device_type == "cuda" and torch.cuda.is_available():
            return MixedPrecision("bf16" if bf16_supported("cuda") else "fp16", device_type)
        return MixedPrecision("off", device_type)
    return MixedPrecision(mode, device_type)
