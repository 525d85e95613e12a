"""`diagnose_collapse` refuses impossible input (issue 24 item 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmd.losses import diagnose_collapse

K = 1024
LOG_K = math.log(K)


@pytest.mark.parametrize(("h", "hb"), [
    (math.nan, math.nan),  # was "healthy"
    (math.nan, 0.0),  # was "one_hot"
    (-1.0, -1.0),  # was "one_hot"
    (math.inf, math.inf),  # was "uniform"
    (100.0, 100.0),  # above log K = 6.93: was "uniform"
    (1.0, -math.inf),
    (1.0, LOG_K * 1.01),
])
def test_impossible_entropies_are_refused(h, hb):
    with pytest.raises(ValueError, match=r"(teacher_entropy|teacher_batch_entropy) = .* is impossible.*log K"):
        diagnose_collapse(h, hb, K)


@pytest.mark.parametrize("out_dim", [2.5, 2.0, "1024", True, 1, 0, -3, None])
def test_out_dim_must_be_an_integer_of_at_least_two(out_dim):
    with pytest.raises(ValueError, match=r"out_dim .* must be an integer >= 2"):
        diagnose_collapse(1.0, 2.0, out_dim)


def test_the_bounds_themselves_and_integer_types_are_accepted():
    # a uniform teacher computed in float32 lands a hair above log K: that is rounding, not impossible
    p = torch.softmax(torch.zeros(4, K), -1)
    h = float(-(p * p.log()).sum(-1).mean())
    assert diagnose_collapse(h, h, K) == "uniform"
    assert diagnose_collapse(LOG_K, LOG_K, np.int64(K)) == "uniform"
    assert diagnose_collapse(0.0, 0.0, K) == "one_hot"
    assert diagnose_collapse(torch.tensor(1.5), torch.tensor(6.5), K) is None  # 0-dim tensors, as in `terms`
    with pytest.raises(ValueError, match="tolerance"):
        diagnose_collapse(1.0, 2.0, K, tolerance=math.nan)
