"""Optimiser helpers: DINO's parameter groups, per-iteration schedules and gradient clipping.

The training recipe (method.md section 4): AdamW, weight decay only on weights of rank >= 2 (no decay
on biases and 1-D parameters such as norms), learning rate and weight decay set every iteration from
cosine schedules, and each parameter's gradient clipped separately to norm 3.0.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    >>> opt = torch.optim.AdamW(param_groups(model, weight_decay=0.04))
    >>> model(torch.randn(2, 4)).sum().backward()
    >>> norms = clip_gradients(model, max_norm=3.0)  # [4] per-parameter norms before clipping
    >>> set_schedules(opt, lr=1e-4, weight_decay=0.05)
    >>> [g["weight_decay"] for g in opt.param_groups]
    [0.05, 0.0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cmd._unwrap import unwrap_model

__all__ = ["param_groups", "set_schedules", "clip_gradients", "WEIGHT_DECAY_KEY"]

# Marks a parameter group whose weight decay follows the schedule (saved with the optimizer state).
WEIGHT_DECAY_KEY = "apply_weight_decay"


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a non-decayed group (DINO's rule).

    A parameter gets no weight decay when its name ends in ``.bias`` (or is ``bias``) or it has one
    dimension or fewer (norm scales, scalars, ...). Parameters with ``requires_grad=False`` are left out.
    DDP / ``torch.compile`` wrappers are removed first, so names are the plain module's.

    Args:
        model: the network.
        weight_decay: the initial weight decay of the decayed group (``set_schedules`` changes it).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay, "apply_weight_decay": True, "name": "decay"},
        {"params": [...], "weight_decay": 0.0, "apply_weight_decay": False, "name": "no_decay"}]``;
        a group without parameters is omitted. Pass it to any ``torch.optim`` optimiser.

    Example:
        >>> import torch
        >>> groups = param_groups(torch.nn.Linear(3, 2), weight_decay=0.04)
        >>> [(g["name"], len(g["params"])) for g in groups]
        [('decay', 1), ('no_decay', 1)]
    """
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or name == "bias" or param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), WEIGHT_DECAY_KEY: True, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, WEIGHT_DECAY_KEY: False, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return groups


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this iteration's learning rate and weight decay on every parameter group.

    Every group gets ``lr`` (times its ``"lr_scale"`` entry, if any). The weight decay is set on the
    groups marked ``"apply_weight_decay": True`` (as made by [`param_groups`][cmd.optim.param_groups]); a group without
    that mark gets it when its current weight decay is non-zero, so non-decayed groups stay at 0.
    Values are stored as Python floats (a numpy scalar from a schedule would not load with
    ``torch.load(weights_only=True)`` from a checkpoint of the optimiser).

    Args:
        optimizer: the optimiser.
        lr: the learning rate, e.g. ``lr_schedule[it]``.
        weight_decay: the weight decay, e.g. ``wd_schedule[it]``; None leaves it unchanged.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD(param_groups(torch.nn.Linear(2, 2), 0.04), lr=0.1)
        >>> set_schedules(opt, lr=0.5, weight_decay=0.1)
        >>> [(g["lr"], g["weight_decay"]) for g in opt.param_groups]
        [(0.5, 0.1), (0.5, 0.0)]
    """
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
    if weight_decay is not None:
        weight_decay = float(weight_decay)
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")
    for group in optimizer.param_groups:
        group["lr"] = lr * float(group.get("lr_scale", 1.0))
        if weight_decay is None:
            continue
        decayed = group.get(WEIGHT_DECAY_KEY)
        if decayed is None:
            decayed = group.get("weight_decay", 0.0) != 0.0
        if decayed:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(model: nn.Module, max_norm: float, per_parameter: bool = True) -> torch.Tensor:
    """Clip gradients in place and return their norms before clipping (for logging).

    ``per_parameter=True`` is DINO's rule: each parameter's gradient ``g`` with norm ``n`` is scaled by
    ``min(1, max_norm / (n + 1e-6))`` on its own. ``per_parameter=False`` clips the global norm over all
    gradients (``torch.nn.utils.clip_grad_norm_``). All work is batched (``torch._foreach_norm`` /
    ``_foreach_mul_``) and nothing is synchronised with the host. With fp16 mixed precision call
    ``scaler.unscale_(optimizer)`` first.

    Args:
        model: the network (wrappers are fine); parameters without a gradient are skipped.
        max_norm: the largest norm allowed (> 0; ``float("inf")`` only measures).
        per_parameter: clip each parameter separately (True) or the global norm (False).

    Returns:
        ``per_parameter=True``: float32 [P] norms of the P gradients, in ``named_parameters`` order;
        ``per_parameter=False``: the 0-d global norm. Empty / 0 when no parameter has a gradient.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> lin.weight.grad = torch.tensor([[3.0, 4.0]]); lin.bias.grad = torch.tensor([0.5])
        >>> clip_gradients(lin, max_norm=1.0)
        tensor([5.0000, 0.5000])
        >>> lin.weight.grad
        tensor([[0.6000, 0.8000]])
    """
    max_norm = float(max_norm)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    params = [p for p in unwrap_model(model).parameters() if p.grad is not None]
    if not per_parameter:
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(0)
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    # The 0-d norms are gathered on the first gradient's device (a no-op with a single device).
    device = grads[0].device
    norms = torch.stack([n.to(device=device, dtype=torch.float32) for n in norms])
    scale = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(grads, [s.to(g.device) for s, g in zip(scale.unbind(), grads)])
    return norms
