"""Seeded, class-balanced subsets of a labelled training set (the partial-label protocols)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["class_balanced_subset", "class_balanced_split"]


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


def class_balanced_split(
    labels: torch.Tensor | Sequence[int], fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded, class-balanced hold-out: (kept indices, held-out indices) of a labelled set.

    Every class with ``n_c >= 2`` samples holds out ``min(n_c - 1, max(1, round(fraction * n_c)))``
    of them, drawn by a generator seeded with ``seed``, so that every class keeps at least one
    sample and has at least one held out; a class with a single sample is kept whole. This is the
    validation split the linear probe picks its learning rate on (never the test split).

    Args:
        labels: [N] integer class labels.
        fraction: in (0, 1), the share of every class to hold out.
        seed: seed of the draw.

    Returns:
        (kept [N - n] int64, held_out [n] int64), both sorted; together they are ``range(N)``.

    Example:
        >>> kept, held_out = class_balanced_split([0, 0, 0, 0, 1, 1], 0.25)
        >>> kept.tolist(), held_out.tolist()
        ([0, 1, 2, 4], [3, 5])
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be a number in (0, 1), got {fraction!r}")
    y = torch.as_tensor(labels)
    if y.ndim != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(f"labels must be a 1-D integer sequence, got dtype {y.dtype} and shape {tuple(y.shape)}")
    y = y.cpu().numpy()
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(y):  # a loop over classes, not samples
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            continue
        n_out = min(len(members) - 1, max(1, round(fraction * len(members))))
        held.append(rng.choice(members, size=n_out, replace=False))
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(y)), held_out)
    return torch.from_numpy(kept).long(), torch.from_numpy(held_out).long()
