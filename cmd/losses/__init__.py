"""Distillation losses: `CMDLoss` (presets "dino", "esvit", "cmd") and its tensor-in "dino" form `DINOLoss`.

``center.py`` holds the teacher normalisation (`Center`, `sinkhorn_knopp`), ``functional.py`` the
float32 blocks (aggregated targets, matching, bags, KL, KoLeo), ``fused.py`` the one custom autograd
kernel (the student's region prototype layer fused with its cross-entropy), ``cmd.py`` the loss.

Example:
    >>> import torch
    >>> from cmd.losses import DINOLoss
    >>> DINOLoss(out_dim=8, n_local_crops=2)(torch.randn(4 * 2, 8), torch.randn(2 * 2, 8), epoch=0).dim()
    0
"""

from __future__ import annotations

from cmd.losses.center import Center, sinkhorn_knopp
from cmd.losses.cmd import TERM_NAMES, CMDLoss, CMDLossOutput, diagnose_collapse
from cmd.losses.dino import DINOLoss
from cmd.losses.functional import koleo

__all__ = ["CMDLoss", "CMDLossOutput", "DINOLoss", "Center", "sinkhorn_knopp", "koleo", "diagnose_collapse", "TERM_NAMES"]
