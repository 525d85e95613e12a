"""part_weight_mass against an explicit per-token loop written here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cmd.data import SyntheticFineGrained
from cmd.eval import part_token_mask, part_weight_mass, pointing_game, top_k_part_iou


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


# ----------------------------------------------------------------------------- pointing game and top-k IoU
def _reference_part_tokens(masks, grid):
    h, w = grid
    height, width = masks.shape[1:]
    out = []
    for b in range(masks.shape[0]):
        row = []
        for i in range(h):
            for j in range(w):
                rows = range(math.floor(i * height / h), math.ceil((i + 1) * height / h))
                cols = range(math.floor(j * width / w), math.ceil((j + 1) * width / w))
                row.append(any(bool(masks[b, r, c]) for r in rows for c in cols))
        out.append(row)
    return out


def test_pointing_game_and_iou_match_loops():
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(6, 12, 12, generator=g) > 0.9
    masks[0] = False  # no part token at all
    weights = torch.softmax(3 * torch.randn(6, 16, generator=g), dim=1)
    part = _reference_part_tokens(masks, (4, 4))
    hits, ious, chances = [], [], []
    for b in range(6):
        row = weights[b].tolist()
        top = max(range(16), key=lambda i: (row[i], -i))  # no ties in random weights
        hits.append(1.0 if part[b][top] else 0.0)
        k = sum(part[b])
        ranked = sorted(range(16), key=lambda i: -row[i])[:k]
        truth = {i for i in range(16) if part[b][i]}
        inter, union = len(set(ranked) & truth), len(set(ranked) | truth)
        ious.append(inter / union if union else 0.0)
        # chance: the mean IoU over every k-subset, enumerated
        if k == 0:
            chances.append(0.0)
        else:
            subsets = list(itertools.combinations(range(16), k))
            chances.append(sum(len(set(s) & truth) / len(set(s) | truth) for s in subsets) / len(subsets))
    assert pointing_game(weights, masks, (4, 4)).tolist() == hits
    iou, chance = top_k_part_iou(weights, masks, (4, 4))
    torch.testing.assert_close(iou, torch.tensor(ious))
    torch.testing.assert_close(chance, torch.tensor(chances))


def test_pointing_game_ties_and_uniform_weights():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True  # token 0 of a 2 x 2 grid
    masks[1] = True  # the part covers the image
    uniform = torch.full((2, 4), 0.25)
    assert pointing_game(uniform, masks, (2, 2)).tolist() == [0.0, 1.0]
    tied = torch.tensor([[0.4, 0.4, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    assert pointing_game(tied, masks, (2, 2)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="NaN or inf"):
        pointing_game(torch.full((2, 4), float("nan")), masks, (2, 2))
    with pytest.raises(ValueError, match="N = 3 tokens"):
        top_k_part_iou(torch.full((2, 3), 1 / 3), masks, (2, 2))
