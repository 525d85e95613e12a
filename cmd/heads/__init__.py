"""Projection heads: `DINOHead`, `CrossLevelHead` and their output `CrossLevelOutput`.

Example:
    >>> import torch
    >>> from cmd.heads import CrossLevelHead
    >>> head = CrossLevelHead(16, out_dim=32, hidden_dim=8, bottleneck_dim=4)
    >>> head(torch.randn(2, 9, 16), pooled=torch.randn(2, 16)).region.shape
    torch.Size([2, 9, 32])
"""

from __future__ import annotations

from cmd.heads.cross_level import CrossLevelHead
from cmd.heads.dino_head import (
    DINOHead,
    cancel_last_layer_gradients,
    legacy_to_parametrized_keys,
    parametrized_to_legacy_keys,
)
from cmd.heads.output import CrossLevelOutput

__all__ = [
    "CrossLevelHead",
    "CrossLevelOutput",
    "DINOHead",
    "cancel_last_layer_gradients",
    "legacy_to_parametrized_keys",
    "parametrized_to_legacy_keys",
]
