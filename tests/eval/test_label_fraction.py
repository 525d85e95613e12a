"""class_balanced_subset: seeded, per-class fractions."""

from __future__ import annotations

import pytest
import torch

from cmd.eval import class_balanced_subset


def test_fraction_per_class_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 1)
    keep = class_balanced_subset(labels, 0.5, seed=1)
    assert torch.bincount(labels[keep]).tolist() == [5, 2, 1]  # at least one sample per class
    assert torch.equal(keep, class_balanced_subset(labels, 0.5, seed=1))
    assert not torch.equal(keep, class_balanced_subset(labels, 0.5, seed=2))
    assert keep.tolist() == sorted(set(keep.tolist()))
    assert class_balanced_subset(labels, 1.0).tolist() == list(range(15))
    assert torch.bincount(labels[class_balanced_subset(labels, 0.2)]).tolist() == [2, 1, 1]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, True])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="label_fraction"):
        class_balanced_subset([0, 1], fraction)
