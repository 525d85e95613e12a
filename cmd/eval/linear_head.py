"""The linear head of the probe and its accuracy on features."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearProbe", "probe_accuracy"]


class LinearProbe(nn.Module):
    """A linear classifier on frozen features: ``logits = W x + b``.

    The weights start from N(0, 0.01^2) and the bias from 0; ``seed`` makes the start reproducible
    (and identical on every process).

    Args:
        in_features: D, the feature dimension (e.g. 4 x 384 = 1536 for ViT-S/16 with 4 blocks,
            2304 for Swin-T).
        num_classes: C.
        seed: seed of the initial weights (None: torch's global generator).

    Example:
        >>> probe = LinearProbe(1536, 200, seed=0)
        >>> probe(torch.zeros(8, 1536)).shape
        torch.Size([8, 200])
    """

    def __init__(self, in_features: int, num_classes: int, *, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.linear = nn.Linear(in_features, num_classes)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] features -> [B, C] logits."""
        if features.ndim != 2 or features.shape[1] != self.linear.in_features:
            raise ValueError(f"features must have shape [B, {self.linear.in_features}], got {tuple(features.shape)}")
        return self.linear(features)


def probe_accuracy(
    probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Top-1 and top-5 (over min(5, C) classes) accuracy in % of ``probe`` on features [N, D]."""
    device = next(probe.parameters()).device
    correct1 = correct5 = 0.0
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            logits = probe(features[start : start + batch_size].to(device).float())
            y = labels[start : start + batch_size].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            correct1 += float(top[:, 0].sum())
            correct5 += float(top.any(dim=1).sum())
    n = max(1, features.shape[0])
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}
