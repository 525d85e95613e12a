"""Seeded, class-balanced subsets of a labelled training set (the partial-label protocols)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["class_balanced_subset"]


def check_label_fraction(fraction: float) -> float:
    """``fraction`` if it is a number in (0, 1], else a ValueError saying so."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"label_fraction must be a number in (0, 1], got {fraction!r}")
    return fraction


def class_balanced_subset(
    labels: torch.Tensor | Sequence[int], fraction: float, seed: int = 0
) -> torch.Tensor:
    """Indices of a seeded, class-balanced ``fraction`` of a labelled set.

    Every class keeps ``max(1, round(fraction * n_c))`` of its ``n_c`` samples, drawn without
    replacement by a generator seeded with ``seed`` (the same subset on every process and run), so
    the class proportions are those of the full set (e.g. the 20 % and 50 % label protocols).

    Args:
        labels: [N] integer class labels.
        fraction: in (0, 1]; 1 keeps everything.
        seed: seed of the draw.

    Returns:
        [n] int64 indices into ``labels``, sorted.

    Example:
        >>> class_balanced_subset([0, 0, 0, 0, 1, 1], 0.5).tolist()
        [2, 3, 4]
    """
    check_label_fraction(fraction)
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be a 1-D integer sequence, got dtype {y.dtype} and shape {tuple(y.shape)}")
    y = y.cpu().numpy()
    if fraction == 1:
        return torch.arange(len(y), dtype=torch.long)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):  # a loop over classes, not samples
        members = np.flatnonzero(y == c)
        n_keep = max(1, round(fraction * len(members)))
        keep.append(rng.choice(members, size=n_keep, replace=False))
    return torch.from_numpy(np.sort(np.concatenate(keep))).long()
