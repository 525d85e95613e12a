"""Reference numerics: make a timm backbone compute exactly what EsViT's Swin or DINO's ViT computes.

timm's models and the reference implementations share their weights (a checkpoint converts key for
key) but not every detail of the forward pass. Three details change the features:

==========  ==========================================  ============================================
numerics    what changes (on top of timm's modules)     why
==========  ==========================================  ============================================
``"timm"``  nothing (the default)                       timm's own behaviour
``"esvit"`` Swin: every LayerNorm ``eps=1e-6``; shifted  EsViT / CMD build Swin with
            window attention *pads, then shifts* the     ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``
            windows (timm shifts, then pads)             and pad a stage to a multiple of the window
                                                         before the cyclic shift
``"dino"``  ViT: position embeddings interpolated        DINO's ``interpolate_pos_encoding``; timm
            bicubically with ``scale_factor = (n + 0.1)  resamples to the target size with antialias
            / n0`` per axis, no antialias
==========  ==========================================  ============================================

The two orders of padding and shifting agree when a stage's resolution is a multiple of its window
(every stage at 224 px, and 112 px for window 7 and 14), so ``"esvit"`` changes 224 px features only
by the LayerNorm epsilon (Swin-T: max abs difference ~9e-5 on tokens of magnitude ~8), but 96 px
local crops by up to 1.0 (W7) / 0.22 (W14) on tokens, random weights. DINO's interpolation is the
identity at the training grid (224 px) and changes other sizes (ViT-S/16 at 96 px: up to 3.9 on
tokens). With the matching numerics the differences to the references are 0 (Swin) and ~3e-6 (ViT,
the attention kernel); the table with every measurement is in ``docs/blocks/backbones.md``.

Implementation: ``"esvit"`` sets ``eps`` on the model's LayerNorms and gives each Swin block the
class `EsViTSwinBlock`, a subclass of timm's ``SwinTransformerBlock`` that overrides the one
window-attention step; ``"dino"`` gives the model the class `DINOVisionTransformer`, a subclass of
timm's ``VisionTransformer`` that overrides the position-embedding step. Parameters, state-dict
keys and everything else stay timm's. DINO's interpolation is linear in the position embeddings,
so it is computed once per grid size as a matrix ``[h * w, h0 * w0]`` (by interpolating the unit
basis with PyTorch's own bicubic kernel) and applied as one float32 matrix product per forward:
gradients reach ``pos_embed`` as in DINO, nothing is re-derived per step.

Example:
    >>> import torch
    >>> from cmd.backbones import create_backbone
    >>> bb = create_backbone("vit_tiny", depth=1, numerics="dino").eval()
    >>> bb.numerics, bb(torch.randn(1, 3, 96, 96)).grid
    ('dino', (6, 6))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

__all__ = [
    "NUMERICS",
    "DINOVisionTransformer",
    "EsViTSwinBlock",
    "apply_numerics",
    "dino_position_interpolation",
    "numerics_for_format",
]

#: The accepted values of ``numerics``.
NUMERICS = ("timm", "esvit", "dino")

#: LayerNorm epsilon of EsViT's and CMD's Swin (``partial(nn.LayerNorm, eps=1e-6)``).
ESVIT_LAYERNORM_EPS = 1e-6


class EsViTSwinBlock(SwinTransformerBlock):
    """timm's Swin block with EsViT's window attention step: pad to a multiple of the window, then shift.

    timm rolls the ``[B, H, W, C]`` map by ``-shift`` and then pads it at the bottom/right; EsViT pads
    first and rolls the padded ``[B, Hp, Wp, C]`` map, so padding tokens wrap around to the top/left
    and the shifted-window mask (timm's ``get_attn_mask``, the same regions as EsViT's) is laid over
    the padded map. Everything else (weights, window and shift sizes, the attention itself) is the
    parent's. Used by ``numerics="esvit"``; not built directly.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``: windowed attention, EsViT's pad-then-shift order."""
        _, h, w, c = x.shape
        wh, ww = self.window_size
        pad_h = (wh - h % wh) % wh
        pad_w = (ww - w % ww) % ww
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = h + pad_h, w + pad_w
        shifted = any(self.shift_size)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        windows = self.attn(windows, mask=mask)
        x = window_reverse(windows.view(-1, wh, ww, c), self.window_size, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :h, :w, :].contiguous()


def dino_position_interpolation(
    base_grid: tuple[int, int], grid: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """DINO's bicubic position-embedding interpolation as a matrix ``[h * w, h0 * w0]`` (float32).

    Row ``i * w + j`` holds the weights of the ``h0 x w0`` base embeddings in the embedding of patch
    ``(i, j)`` of an ``h x w`` grid: ``F.interpolate(..., scale_factor=((h + 0.1) / h0, (w + 0.1) / w0),
    mode="bicubic")`` (``align_corners=False``, no antialias) applied to the unit basis, so
    ``matrix @ pos [h0 * w0, D]`` equals DINO's interpolation of ``pos`` up to float rounding.

    Example:
        >>> m = dino_position_interpolation((14, 14), (6, 6))
        >>> m.shape, round(float(m.sum(dim=1).mean()), 5)
        (torch.Size([36, 196]), 1.0)
    """
    h0, w0 = base_grid
    h, w = grid
    basis = torch.eye(h0 * w0, dtype=torch.float32, device=device).view(h0 * w0, 1, h0, w0)
    out = F.interpolate(basis, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic")
    if tuple(out.shape[-2:]) != (h, w):  # cannot happen for h, w >= 1; guards the formula
        raise RuntimeError(f"DINO interpolation gave a {tuple(out.shape[-2:])} grid, expected {(h, w)}")
    return out.view(h0 * w0, h * w).t().contiguous()


class DINOVisionTransformer(VisionTransformer):
    """timm's ViT with DINO's position-embedding interpolation for grids other than the training grid.

    Only ``_pos_embed`` changes: the patch position embeddings ``[1, h0 * w0, D]`` (``h0 x w0`` =
    ``patch_embed.grid_size``) are interpolated to the input's ``h x w`` grid with
    `dino_position_interpolation` (cached per grid size and device), prefix tokens (CLS) are
    prepended and their embeddings added as timm does. At the training grid the embeddings are used
    as they are (as in DINO). Used by ``numerics="dino"``; not built directly.
    """

    def _dino_pos_embed(self, grid: tuple[int, int], prefix: int) -> torch.Tensor:
        pos = self.pos_embed  # [1, prefix + h0 * w0, D]
        base = tuple(int(g) for g in self.patch_embed.grid_size)
        if grid == base:
            return pos
        cache: dict = self.__dict__.setdefault("_dino_interp_cache", {})
        key = (grid, base, pos.device)
        matrix = cache.get(key)
        if matrix is None:
            matrix = cache[key] = dino_position_interpolation(base, grid, device=pos.device)
        with torch.autocast(device_type=pos.device.type, enabled=False):
            patches = (matrix @ pos[0, prefix:].float()).to(pos.dtype)  # [h * w, D]
        return torch.cat([pos[:, :prefix], patches.unsqueeze(0)], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None or x.ndim != 4:  # no embeddings, or a fixed-size model
            return super()._pos_embed(x)
        b, h, w, c = x.shape
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos = self._dino_pos_embed((h, w), prefix)
        x = x.reshape(b, h * w, c)
        tokens = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat([*tokens, x + pos], dim=1)
        else:
            x = torch.cat([*tokens, x], dim=1) + pos
        return self.pos_drop(x)


def numerics_for_format(source_format: str, family: str) -> str:
    """The numerics matching a checkpoint format: EsViT/CMD Swin -> ``"esvit"``, DINO ViT -> ``"dino"``.

    Example:
        >>> numerics_for_format("esvit", "swin"), numerics_for_format("dino", "vit"), numerics_for_format("timm", "vit")
        ('esvit', 'dino', 'timm')
    """
    if source_format == "esvit" and family == "swin":
        return "esvit"
    if source_format == "dino" and family == "vit":
        return "dino"
    return "timm"


def apply_numerics(model: nn.Module, numerics: str) -> None:
    """Switch a timm model (in place) to a reference's numerics; see the module docstring.

    Args:
        model: a timm ``SwinTransformer`` (``"esvit"``) or ``VisionTransformer`` (``"dino"``) still
            computing timm's numerics. ``"timm"`` leaves any model unchanged.
        numerics: ``"timm"``, ``"esvit"`` or ``"dino"``.

    Raises:
        ValueError: an unknown value, or a model the numerics do not apply to.

    Example:
        >>> import timm
        >>> m = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0, dynamic_img_size=True)
        >>> apply_numerics(m, "dino"); type(m).__name__
        'DINOVisionTransformer'
    """
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if numerics == "timm":
        return
    if numerics == "esvit":
        if type(model) is not SwinTransformer:
            raise ValueError(
                f"numerics='esvit' is for timm SwinTransformer (v1) backbones, got {type(model).__name__}"
            )
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = ESVIT_LAYERNORM_EPS
            if type(module) is SwinTransformerBlock:
                module.__class__ = EsViTSwinBlock
        return
    if type(model) is not VisionTransformer:
        raise ValueError(f"numerics='dino' is for timm VisionTransformer backbones, got {type(model).__name__}")
    model.__class__ = DINOVisionTransformer
