"""Backbones: timm ViT / Swin / CNN models with image and region outputs for any crop size.

* `create_backbone` builds a `Backbone` from a timm name or a short alias (``swin_tiny``, ``vit_small``,
  ``resnet50``, ...), optionally loading a checkpoint.
* `Backbone.forward` gives a `BackboneOutput` (``pooled [B, D]``, ``tokens [B, N, D]``, ``grid``);
  `Backbone.forward_multicrop` batches consecutive same-size crops; `Backbone.forward_last_blocks`
  gives linear-probe features.
* ``numerics="esvit"`` / ``"dino"`` reproduce EsViT's Swin / DINO's ViT exactly at every crop size
  (`cmd.backbones.numerics`); `create_backbone` picks them for EsViT / DINO checkpoints.
* `load_pretrained` loads a cmd-fgvc training checkpoint in one call (the architecture is read from it).
* `load_checkpoint` / `export_checkpoint` read and write DINO, EsViT/CMD (original Swin layout), timm and
  this library's checkpoints.

Example:
    >>> import torch
    >>> from cmd.backbones import create_backbone
    >>> bb = create_backbone("vit_tiny", depth=1).eval()
    >>> bb(torch.randn(1, 3, 32, 48)).grid
    (2, 3)
"""

from __future__ import annotations

from .backbone import FAMILIES, Backbone
from .checkpoints import LoadReport, export_checkpoint, load_checkpoint, read_checkpoint_file
from .factory import ALIASES, create_backbone, resolve_model_name
from .numerics import NUMERICS, apply_numerics
from .output import BackboneOutput
from .pretrained import load_pretrained

__all__ = [
    "ALIASES",
    "FAMILIES",
    "Backbone",
    "BackboneOutput",
    "LoadReport",
    "NUMERICS",
    "apply_numerics",
    "create_backbone",
    "export_checkpoint",
    "load_checkpoint",
    "load_pretrained",
    "read_checkpoint_file",
    "resolve_model_name",
]
