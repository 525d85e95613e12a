"""The numerical blocks: aggregated targets, bags, KL and KoLeo, against explicit code."""

from __future__ import annotations

import math

import pytest
import torch

from cmd.losses import koleo
from cmd.losses.functional import aggregate_targets, bag_log_prob, kl_rows, target_index


def test_image_targets_sum_every_other_teacher_crop():
    g, v, b = 3, 5, 2
    probs = torch.randn(g * b, 4)  # rows g * B + b
    index, valid = target_index(torch.zeros(v, b, 1, g, dtype=torch.long), 0, b, 1)
    targets = aggregate_targets(probs, index, valid).view(v, b, 4)
    for crop in range(v):
        for i in range(b):
            expected = sum(probs[t * b + i] for t in range(g) if t != crop)
            torch.testing.assert_close(targets[crop, i], expected)


def test_region_targets_gather_matched_rows_of_every_other_teacher_crop():
    b, n, g, n_t = 2, 3, 2, 4
    probs = torch.randn(g * b * n_t, 5)
    for first, crops in ((0, 1), (1, 2)):
        matches = torch.randint(0, n_t, (crops, b, n, g))
        targets = aggregate_targets(probs, *target_index(matches, first, b, n_t)).view(crops, b, n, 5)
        for c in range(crops):
            for bi in range(b):
                for j in range(n):
                    rows = [(t * b + bi) * n_t + int(matches[c, bi, j, t]) for t in range(g) if t != first + c]
                    torch.testing.assert_close(targets[c, bi, j], sum(probs[r] for r in rows))


def test_bag_log_prob_and_gradients_with_zero_weights_equal_probability_space():
    log_q = torch.log_softmax(torch.randn(4, 5, 6, dtype=torch.float64), -1).float().requires_grad_()
    w = torch.softmax(torch.randn(4, 5), -1)
    w[0, :3] = 0.0
    w[1, 4] = 0.0
    w = (w / w.sum(-1, keepdim=True)).requires_grad_()
    g = torch.randn(4, 6)
    log_b = bag_log_prob(log_q, w)
    (log_b * g).sum().backward()
    lq64, w64 = log_q.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (w64.unsqueeze(-1) * lq64.exp()).sum(1).log()  # log sum_j w_j q_j
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(log_b.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_q.grad.double(), lq64.grad, rtol=1e-5, atol=1e-6)
    positive = w > 0  # a weight of exactly 0 gets gradient 0 (documented)
    torch.testing.assert_close(w.grad.double()[positive], w64.grad[positive], rtol=1e-5, atol=1e-5)
    assert (w.grad[~positive] == 0).all()


def test_bag_of_all_zero_weights_and_extreme_logits_is_finite():
    log_q = torch.log_softmax(torch.randn(2, 3, 4) * 1e5, -1).requires_grad_()
    w = torch.zeros(2, 3, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(2, 4), -1)
    kl = kl_rows(bag_log_prob(log_q, w), log_p)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(log_q.grad).all() and torch.isfinite(w.grad).all()


def _koleo_reference(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Straightforward loops: unit vectors, the nearest other row by Euclidean distance, -mean log(d + eps)."""
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True)
    total = 0.0
    for i in range(x.shape[0]):
        d = min(float((x[i] - x[j]).norm()) for j in range(x.shape[0]) if j != i)
        total += -math.log(d + eps)
    return torch.tensor(total / x.shape[0], dtype=torch.float64)


def test_koleo_equals_straightforward_loops_and_spreads_points():
    gen = torch.Generator().manual_seed(0)
    for rows, dim in ((2, 3), (7, 5), (16, 4)):
        x = torch.randn(rows, dim, generator=gen) * 3
        torch.testing.assert_close(koleo(x).double(), _koleo_reference(x), rtol=1e-5, atol=1e-6)
    x = torch.randn(8, 4, generator=gen, requires_grad=True)
    koleo(x).backward()
    y = (x - 0.01 * x.grad).detach()  # a step against the gradient raises the nearest distances
    assert koleo(y) < koleo(x)


def test_koleo_is_finite_for_duplicates_and_refuses_one_row():
    x = torch.randn(1, 6).repeat(4, 1).requires_grad_()
    value = koleo(x)
    value.backward()
    assert torch.isfinite(value) and float(value.detach()) == pytest.approx(-math.log(1e-8), rel=1e-3)
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="R >= 2"):
        koleo(torch.randn(1, 3))
