"""Tiny backbone configurations shared by the backbone tests (fast on a CPU)."""

from __future__ import annotations

import torch

from cmd.backbones import Backbone, create_backbone

# Swin-T layout (patch 4, window 7, 4 stages, built for 224 px) with narrow stages.
TINY_SWIN = {"embed_dim": 24, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}
TINY_VIT = {"depth": 2}
TINY_RESNET = {"layers": (1, 1, 1, 1)}


def tiny(family: str, seed: int = 0, **kwargs) -> Backbone:
    """A small, seeded backbone of ``family`` in eval mode."""
    torch.manual_seed(seed)
    if family == "swin":
        bb = create_backbone("swin_tiny", **{**TINY_SWIN, **kwargs})
    elif family == "vit":
        bb = create_backbone("vit_tiny", **{**TINY_VIT, **kwargs})
    elif family == "cnn":
        bb = create_backbone("resnet18", **{**TINY_RESNET, **kwargs})
    else:
        raise ValueError(family)
    return bb.eval()


def images(b: int, h: int, w: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, h if w is None else w, generator=g)
