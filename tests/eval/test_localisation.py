"""part_weight_mass against an explicit per-token loop written here."""

from __future__ import annotations

import math

import pytest
import torch

from cmd.data import SyntheticFineGrained
from cmd.eval import part_token_mask, part_weight_mass


def reference_mass(weights, masks, grid):
    """Loop over images and tokens; token (i, j) covers rows floor(i H / h) .. ceil((i + 1) H / h)."""
    h, w = grid
    out = []
    for b in range(weights.shape[0]):
        height, width = masks.shape[1:]
        total = 0.0
        for i in range(h):
            for j in range(w):
                rows = range(math.floor(i * height / h), math.ceil((i + 1) * height / h))
                cols = range(math.floor(j * width / w), math.ceil((j + 1) * width / w))
                if any(bool(masks[b, r, c]) for r in rows for c in cols):
                    total += float(weights[b, i * w + j])
        out.append(total)
    return torch.tensor(out)


@pytest.mark.parametrize(("size", "grid"), [((16, 16), (4, 4)), ((15, 13), (4, 3)), ((7, 9), (7, 9))])
def test_matches_loop(size, grid):
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, *size, generator=g) > 0.93
    weights = torch.softmax(torch.randn(5, grid[0] * grid[1], generator=g), dim=1)
    torch.testing.assert_close(part_weight_mass(weights, masks, grid), reference_mass(weights, masks, grid))


def test_all_or_nothing_and_chance_level():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True  # exactly the top-left token of a 2 x 2 grid
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    assert part_weight_mass(weights, masks, (2, 2)).tolist() == [1.0, 0.0]
    assert part_token_mask(masks, (2, 2)).tolist() == [[True, False, False, False]] * 2
    # a token counts only when over half of it is covered with min_overlap=0.5
    masks[0, :4, 4:6] = True
    assert part_token_mask(masks, (2, 2), min_overlap=0.5)[0].tolist() == [True, False, False, False]
    assert part_token_mask(masks, (2, 2), min_overlap=0.0)[0].tolist() == [True, True, False, False]


def test_on_synthetic_part_masks():
    data = SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=64, return_part_mask=True)
    masks = torch.stack([data[i][2] for i in range(len(data))])
    uniform = torch.full((len(data), 64), 1 / 64)
    mass = part_weight_mass(uniform, masks, (8, 8))
    # a 12 px part covers 2 to 3 tokens of 8 px per side: 4 to 9 of 64 tokens
    assert ((mass >= 4 / 64 - 1e-6) & (mass <= 9 / 64 + 1e-6)).all()


def test_shape_errors():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="N = 5 tokens but the grid"):
        part_weight_mass(torch.rand(2, 5), masks, (2, 2))
    with pytest.raises(ValueError, match="B = 3 rows"):
        part_weight_mass(torch.rand(3, 4), masks, (2, 2))
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        part_weight_mass(torch.rand(2, 4), masks[0], (2, 2))
    with pytest.raises(ValueError, match="smaller than the grid"):
        part_weight_mass(torch.rand(2, 100), masks, (10, 10))
