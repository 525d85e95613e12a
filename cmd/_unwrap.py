"""`unwrap_model`: the plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap_model"]


def unwrap_model(module: nn.Module) -> nn.Module:
    """Return the module a ``DistributedDataParallel``, ``DataParallel`` or ``torch.compile`` wrapper holds.

    Wrappers may nest (a compiled DDP model, a DDP-wrapped compiled model); all are removed. A plain
    module is returned as it is. Only those wrapper types are unwrapped: a user module that merely has
    a ``.module`` attribute is left alone.

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.compile(net)) is net
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), nn.Module
        ):
            module = module._orig_mod
        else:
            return module
