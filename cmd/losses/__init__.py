"""Distillation losses: DINO's image level, EsViT's region level and the CMD cross-level loss.

All three share `targets` (teacher temperature, centering, aggregated targets, center updates
all-reduced over processes) and `functional` (float32 soft cross-entropy, multi-instance bags).

Example:
    >>> import torch
    >>> from cmd.losses import DINOLoss
    >>> DINOLoss(out_dim=8, n_crops=4)(torch.randn(4 * 2, 8), torch.randn(2 * 2, 8), epoch=0).dim()
    0
"""

from __future__ import annotations

from cmd.losses.cmd import TERM_NAMES, CMDLoss, CMDLossOutput
from cmd.losses.dino import DINOLoss
from cmd.losses.region import RegionDistillationLoss
from cmd.losses.targets import CenteredTeacherLoss, teacher_temperature

__all__ = [
    "DINOLoss",
    "RegionDistillationLoss",
    "CMDLoss",
    "CMDLossOutput",
    "CenteredTeacherLoss",
    "TERM_NAMES",
    "teacher_temperature",
]
