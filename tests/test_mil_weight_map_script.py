"""benchmarks/mil_weight_map.py: its statistics against a plain per-image loop, and its refusals."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "mil_weight_map.py"


@pytest.fixture(scope="module")
def wmap():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("mil_weight_map", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sx = math.sqrt(sum((a - mx) ** 2 for a in x))
    sy = math.sqrt(sum((b - my) ** 2 for b in y))
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def test_statistics_match_a_plain_loop(wmap):
    torch.manual_seed(0)
    h, w, b = 3, 4, 7
    weights = torch.softmax(3 * torch.randn(b, h * w), dim=1)
    parts = torch.rand(b, h * w) < 0.3
    parts[0] = False  # no part token: left out of the correlation
    parts[1] = True  # the part everywhere: left out too
    stats = wmap.weight_map_stats(weights, parts, (h, w))
    rows = weights.tolist()
    masks = [[float(v) for v in row] for row in parts.tolist()]
    n = h * w
    mean = [sum(r[j] for r in rows) / b for j in range(n)]
    for i in range(h):  # row-major on the grid, times N
        assert stats["mean_map"][i] == pytest.approx([mean[i * w + j] * n for j in range(w)])
    assert stats["top_position_mass"] == pytest.approx(max(mean))
    assert stats["uniform_share"] == pytest.approx(1 / n)
    assert stats["part_mass"] == pytest.approx(sum(sum(a * m for a, m in zip(r, k)) for r, k in zip(rows, masks)) / b)
    assert stats["uniform_part_mass"] == pytest.approx(sum(sum(k) / n for k in masks) / b)
    correlations = [c for c in (_pearson(r, k) for r, k in zip(rows, masks)) if c is not None]
    assert len(correlations) == b - 2 and stats["part_correlation"] == pytest.approx(sum(correlations) / len(correlations))
    entropies = [-sum(a * math.log(a) for a in r) / math.log(n) for r in rows]
    assert stats["entropy_ratio"] == pytest.approx(sum(entropies) / b)


def test_uniform_weights_and_bad_shapes(wmap):
    parts = torch.zeros(2, 4, dtype=torch.bool)
    parts[:, 0] = True
    stats = wmap.weight_map_stats(torch.full((2, 4), 0.25), parts, (2, 2))
    assert stats["mean_map"] == [[1.0, 1.0], [1.0, 1.0]] and stats["entropy_ratio"] == pytest.approx(1.0)
    assert stats["part_correlation"] is None  # constant weights: no correlation to speak of
    with pytest.raises(ValueError, match="grid"):
        wmap.weight_map_stats(torch.full((2, 4), 0.25), parts, (3, 2))
    with pytest.raises(ValueError, match="must both be"):
        wmap.weight_map_stats(torch.full((2, 4), 0.25), parts[:1], (2, 2))
