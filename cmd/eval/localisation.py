"""Part localisation: how much multi-instance weight falls on the discriminative part, and whether the
most-weighted tokens find it.

- `part_weight_mass`: the weight on the part's tokens (chance: the part's share of the tokens);
- `pointing_game`: whether the single most-weighted token lies on the part;
- `top_k_part_iou`: the IoU of the k most-weighted tokens with the part's k tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["part_token_mask", "part_weight_mass", "pointing_game", "top_k_part_iou"]


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
    tokens = _weights_and_tokens(weights, part_masks, grid, min_overlap)
    return (weights.float() * tokens).sum(dim=1)


def _weights_and_tokens(weights, part_masks, grid, min_overlap) -> torch.Tensor:
    """The part's token mask [B, N] (bool, on ``weights``' device), after checking ``weights`` against it."""
    if weights.ndim != 2:
        raise ValueError(f"weights must have shape [B, N], got {tuple(weights.shape)}")
    tokens = part_token_mask(part_masks, grid, min_overlap)
    if tokens.shape[0] != weights.shape[0]:
        raise ValueError(f"weights has B = {weights.shape[0]} rows but part_masks has {tokens.shape[0]}")
    if tokens.shape[1] != weights.shape[1]:
        raise ValueError(f"weights has N = {weights.shape[1]} tokens but the grid {tuple(grid)} has {tokens.shape[1]}")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights hold NaN or inf")
    return tokens.to(weights.device)


def pointing_game(
    weights: torch.Tensor, part_masks: torch.Tensor, grid: tuple[int, int], min_overlap: float = 0.0
) -> torch.Tensor:
    """Whether the most-weighted token of each image overlaps the part (the pointing game).

    Args: as `part_weight_mass` (``weights`` [B, N], ``part_masks`` [B, H, W], ``grid`` (h, w)).

    Returns:
        [B] float32, 1.0 where the arg-max token lies on the part. Ties count as a hit only when every
        tied token lies on the part (so uniform weights score 0 unless the part covers the image). The
        chance level of a uniformly random token is the part's share of the tokens (`part_weight_mass`
        of uniform weights).

    Example:
        >>> m = torch.zeros(2, 4, 4, dtype=torch.bool)
        >>> m[:, :2, :2] = True  # the top-left token of a 2 x 2 grid
        >>> pointing_game(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1]]), m, (2, 2))
        tensor([1., 0.])
    """
    tokens = _weights_and_tokens(weights, part_masks, grid, min_overlap)
    w = weights.float()
    top = w == w.amax(dim=1, keepdim=True)  # every tied maximum
    return (top & ~tokens).any(dim=1).logical_not().float()


def top_k_part_iou(
    weights: torch.Tensor, part_masks: torch.Tensor, grid: tuple[int, int], min_overlap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU of the k most-weighted tokens with the part's tokens, k = the number of part tokens of each image.

    Args: as `part_weight_mass`.

    Returns:
        ``(iou [B], chance [B])`` float32: ``|S ∩ P| / |S ∪ P|`` for the top-k set S (ties broken by
        token order) and the part's token set P (|P| = k; 0 for an image whose part covers no token), and
        the expected IoU of a uniformly random k-subset, ``E[x / (2k - x)]`` with x hypergeometric.

    Example:
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool)
        >>> m[:, :2, :] = True  # the top row of a 2 x 2 grid: k = 2
        >>> iou, chance = top_k_part_iou(torch.tensor([[0.4, 0.1, 0.3, 0.2]]), m, (2, 2))
        >>> round(float(iou), 4), round(float(chance), 4)  # S = {0, 2}: one of two in common, IoU 1/3
        (0.3333, 0.3889)
    """
    tokens = _weights_and_tokens(weights, part_masks, grid, min_overlap)
    b, n = tokens.shape
    k = tokens.sum(dim=1)  # [B]
    order = weights.float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    chosen = rank < k.unsqueeze(1)  # the k most-weighted tokens
    inter = (chosen & tokens).sum(dim=1).float()
    union = (chosen | tokens).sum(dim=1).float()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou, _random_subset_iou(k.cpu(), n).to(iou.device)


def _random_subset_iou(k: torch.Tensor, n: int) -> torch.Tensor:
    """``E[x / (2k - x)]`` for x ~ Hypergeometric(n, k, k): the IoU of a random k-subset with a fixed one [B]."""
    out = []
    for kk in k.tolist():
        if kk == 0:
            out.append(0.0)
            continue
        total = math.comb(n, kk)
        out.append(sum(math.comb(kk, x) * math.comb(n - kk, kk - x) / total * x / (2 * kk - x) for x in range(kk + 1)))
    return torch.tensor(out, dtype=torch.float32)
