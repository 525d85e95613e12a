"""Part localisation: how much multi-instance weight falls on the discriminative part."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["part_token_mask", "part_weight_mass"]


def part_token_mask(part_masks: torch.Tensor, grid: tuple[int, int], min_overlap: float = 0.0) -> torch.Tensor:
    """Which tokens of an ``h x w`` grid overlap the part.

    The image is split into ``h x w`` cells (adaptive boundaries when H or W is not a multiple of
    h or w, as ``adaptive_avg_pool2d`` does); a token overlaps the part when the fraction of its
    cell covered by the mask exceeds ``min_overlap`` (0: any pixel).

    Args:
        part_masks: [B, H, W] bool (or 0/1) part masks in the frame of the image the tokens come
            from (a resize keeps them valid, a crop or flip does not).
        grid: (h, w) token grid, row-major as in [`cmd.backbones.BackboneOutput`][cmd.backbones.BackboneOutput].
        min_overlap: in [0, 1).

    Returns:
        [B, h * w] bool.

    Example:
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> m[0, 0, 0] = True
        >>> part_token_mask(m, (2, 2)).tolist()
        [[True, False, False, False]]
    """
    if part_masks.ndim != 3:
        raise ValueError(f"part_masks must have shape [B, H, W], got {tuple(part_masks.shape)}")
    if len(grid) != 2 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be (h, w) with positive sizes, got {grid!r}")
    if not 0 <= min_overlap < 1:
        raise ValueError(f"min_overlap must lie in [0, 1), got {min_overlap!r}")
    h, w = int(grid[0]), int(grid[1])
    if part_masks.shape[1] < h or part_masks.shape[2] < w:
        raise ValueError(f"part_masks of size {tuple(part_masks.shape[1:])} are smaller than the grid {(h, w)}")
    coverage = F.adaptive_avg_pool2d(part_masks[:, None].float(), (h, w))  # [B, 1, h, w]
    return (coverage > min_overlap).flatten(1)


def part_weight_mass(
    weights: torch.Tensor, part_masks: torch.Tensor, grid: tuple[int, int], min_overlap: float = 0.0
) -> torch.Tensor:
    """The multi-instance weight mass on the tokens that overlap the part.

    Args:
        weights: [B, N] region weights (MIL pooling weights, summing to 1 per row), N = h * w.
        part_masks: [B, H, W] bool part masks (e.g. ``SyntheticFineGrained(return_part_mask=True)``).
        grid: (h, w) token grid.
        min_overlap: see `part_token_mask`.

    Returns:
        [B] float32 sum of the weights of the part's tokens (1 means all the weight is on the part;
        uniform weights give the fraction of tokens overlapping it, the chance level).

    Example:
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> m[0, :2, :2] = True
        >>> part_weight_mass(torch.tensor([[0.7, 0.1, 0.1, 0.1]]), m, (2, 2))
        tensor([0.7000])
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must have shape [B, N], got {tuple(weights.shape)}")
    tokens = part_token_mask(part_masks, grid, min_overlap)
    if tokens.shape[0] != weights.shape[0]:
        raise ValueError(f"weights has B = {weights.shape[0]} rows but part_masks has {tokens.shape[0]}")
    if tokens.shape[1] != weights.shape[1]:
        raise ValueError(f"weights has N = {weights.shape[1]} tokens but the grid {tuple(grid)} has {tokens.shape[1]}")
    return (weights.float() * tokens.to(weights.device)).sum(dim=1)
