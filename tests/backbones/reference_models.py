"""Straightforward EsViT-style Swin and DINO-style ViT forward passes, written for the tests.

Both read the weights of a timm model but compute everything themselves from the references'
documented behaviour, with plain tensor operations:

* EsViT's Swin: every LayerNorm with eps 1e-6; a stage's window is the configured one unless the
  stage's resolution *at the 224 px construction size* is not larger than it (then the window is that
  resolution and there is no shift); odd blocks shift by window // 2; the normalised map is padded at
  the bottom/right to a multiple of the window *before* the cyclic shift, the shifted-window regions
  ``[0, -ws), [-ws, -shift), [-shift, end)`` per axis are laid over the padded map (mask -100 between
  regions); patch merging pads odd sizes at the bottom/right and concatenates ``[x(0,0), x(1,0),
  x(0,1), x(1,1)]``.
* DINO's ViT: CLS token prepended, position embeddings used as they are when the grid is the
  training grid and square, else the patch embeddings interpolated with
  ``F.interpolate(scale_factor=((h + 0.1) / n0, (w + 0.1) / n0), mode="bicubic")``; attention as
  ``softmax(q k^T / sqrt(d))``; LayerNorm eps 1e-6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ESVIT_EPS = 1e-6
DINO_EPS = 1e-6


def _ln(x: torch.Tensor, norm, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, eps)


def _mlp(x: torch.Tensor, mlp) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def _attention(x: torch.Tensor, qkv, proj, heads: int, bias=None, mask=None) -> torch.Tensor:
    """Multi-head self-attention of ``x [B', N, C]``; ``bias [heads, N, N]``, ``mask [nW, N, N]``."""
    b, n, c = x.shape
    hd = c // heads
    q, k, v = F.linear(x, qkv.weight, qkv.bias).view(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = (q * hd**-0.5) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(b // nw, nw, heads, n, n) + mask[None, :, None]).view(b, heads, n, n)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    return F.linear(out, proj.weight, proj.bias)


def _relative_bias(table: torch.Tensor, ws: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    index = (ys[:, None] - ys[None, :] + ws - 1) * (2 * ws - 1) + (xs[:, None] - xs[None, :] + ws - 1)
    return table[index].permute(2, 0, 1)  # [heads, N, N]


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    return x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def _shift_mask(hp: int, wp: int, ws: int, shift: int) -> torch.Tensor:
    region = torch.zeros(hp, wp)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[rows, cols] = label
            label += 1
    r = _windows(region.view(1, hp, wp, 1), ws).squeeze(-1)  # [nW, N]
    return (r[:, None, :] != r[:, :, None]).float() * -100.0


def _esvit_block(blk, x: torch.Tensor, ws: int, shift: int) -> torch.Tensor:
    b, h, w, c = x.shape
    y = _ln(x, blk.norm1, ESVIT_EPS)
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))  # pad first ...
    hp, wp = h + pad_b, w + pad_r
    mask = None
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))  # ... then shift
        mask = _shift_mask(hp, wp, ws, shift)
    bias = _relative_bias(blk.attn.relative_position_bias_table, ws)
    y = _attention(_windows(y, ws), blk.attn.qkv, blk.attn.proj, blk.attn.num_heads, bias, mask)
    y = _unwindows(y, ws, b, hp, wp)
    if shift:
        y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
    x = x + y[:, :h, :w]
    return x + _mlp(_ln(x, blk.norm2, ESVIT_EPS), blk.mlp)


@torch.no_grad()
def esvit_swin(model, images: torch.Tensor, window: int, built_for: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    """EsViT's Swin features of ``images [B, 3, H, W]`` with ``model``'s weights: (pooled [B, D], tokens [B, N, D])."""
    pe = model.patch_embed
    x = F.conv2d(images, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).permute(0, 2, 3, 1)
    x = _ln(x, pe.norm, ESVIT_EPS)
    res = built_for // pe.proj.stride[0]
    for s, stage in enumerate(model.layers):
        if s > 0:
            _, h, w, _ = x.shape
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
            x = F.linear(_ln(x, stage.downsample.norm, ESVIT_EPS), stage.downsample.reduction.weight)
            res = (res + 1) // 2
        ws = min(window, res)
        for i, blk in enumerate(stage.blocks):
            shift = ws // 2 if (i % 2 == 1 and res > window) else 0
            x = _esvit_block(blk, x, ws, shift)
    x = _ln(x, model.norm, ESVIT_EPS)
    tokens = x.flatten(1, 2)
    return tokens.mean(dim=1), tokens


@torch.no_grad()
def dino_vit(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO's ViT features of ``images`` with ``model``'s weights: (CLS [B, D], patch tokens [B, N, D])."""
    b, _, height, width = images.shape
    proj = model.patch_embed.proj
    p = proj.stride[0]
    x = F.conv2d(images, proj.weight, proj.bias, stride=p).flatten(2).transpose(1, 2)
    x = torch.cat([model.cls_token.expand(b, -1, -1), x], dim=1)
    pos = model.pos_embed
    n_base = pos.shape[1] - 1
    n0 = int(math.sqrt(n_base))
    h, w = height // p, width // p
    if not (h * w == n_base and height == width):
        d = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, n0, n0, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / n0, (w + 0.1) / n0), mode="bicubic")
        assert grid.shape[-2:] == (h, w)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)], dim=1)
    x = x + pos
    for blk in model.blocks:
        x = x + _attention(_ln(x, blk.norm1, DINO_EPS), blk.attn.qkv, blk.attn.proj, blk.attn.num_heads)
        x = x + _mlp(_ln(x, blk.norm2, DINO_EPS), blk.mlp)
    x = _ln(x, model.norm, DINO_EPS)
    return x[:, 0], x[:, 1:]
