"""The numerical blocks: soft cross-entropy, bags, aggregated targets and centering, against explicit code."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmd.losses.functional import kl_divergence_rows, mixture_log_prob, soft_cross_entropy
from cmd.losses.layout import infer_layout
from cmd.losses.targets import (
    aggregate_targets,
    centered_probs,
    image_target_bags,
    region_target_bags,
)


def test_soft_cross_entropy_value_and_gradient_equal_autograd_with_row_masses():
    x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    mass = torch.tensor([1.0] * 3 + [2.0] * 4)
    target = (torch.softmax(torch.randn(7, 9), -1) * mass[:, None]).float()
    ce, log_probs = soft_cross_entropy(x, target, 0.1, [(3, 1.0), (4, 2.0)])
    assert log_probs is None
    (2.5 * ce).backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = -(target.double() * torch.log_softmax(x_ref / 0.1, -1)).sum()
    (2.5 * ref).backward()
    torch.testing.assert_close(ce.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert x.grad.dtype == torch.float64


def test_soft_cross_entropy_with_log_probs_output_backpropagates_both_paths():
    x = torch.randn(5, 6, requires_grad=True)
    target = torch.softmax(torch.randn(5, 6), -1)
    w = torch.randn(5, 6)
    ce, log_probs = soft_cross_entropy(x, target, 0.5, [(5, 1.0)], return_log_probs=True)
    (0.3 * ce + (w * log_probs).sum()).backward()
    x_ref = x.detach().double().requires_grad_()
    lp = torch.log_softmax(x_ref / 0.5, -1)
    (0.3 * -(target.double() * lp).sum() + (w.double() * lp).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)
    # only the log-probabilities used
    x.grad = None
    _, log_probs = soft_cross_entropy(x, target, 0.5, [(5, 1.0)], return_log_probs=True)
    (w * log_probs).sum().backward()
    x_ref.grad = None
    (w.double() * torch.log_softmax(x_ref / 0.5, -1)).sum().backward()
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)


def test_mixture_log_prob_and_gradients_with_zero_weights_equal_probability_space():
    log_q = torch.log_softmax(torch.randn(4, 5, 6, dtype=torch.float64), -1).float().requires_grad_()
    w = torch.softmax(torch.randn(4, 5), -1)
    w[0, :3] = 0.0
    w[1, 4] = 0.0
    w = (w / w.sum(-1, keepdim=True)).requires_grad_()
    g = torch.randn(4, 6)
    log_b = mixture_log_prob(log_q, w)
    (log_b * g).sum().backward()
    lq64, w64 = log_q.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = (w64.unsqueeze(-1) * lq64.exp()).sum(1).log()  # log sum_j w_j q_j
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(log_b.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_q.grad.double(), lq64.grad, rtol=1e-5, atol=1e-6)
    # d log b / d w_j = q_j / b is also right where w_j == 0
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_mixture_of_all_zero_weights_is_finite():
    log_q = torch.log_softmax(torch.randn(2, 3, 4), -1).requires_grad_()
    w = torch.zeros(2, 3, requires_grad=True)
    log_p = torch.log_softmax(torch.randn(2, 4), -1)
    kl = kl_divergence_rows(mixture_log_prob(log_q, w), log_p)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(log_q.grad).all() and torch.isfinite(w.grad).all()


def test_image_target_bags_sum_every_other_teacher_crop():
    layout = infer_layout([3 * 2, 2 * 2], [3 * 2], n_global=3, n_crops=5)
    probs = torch.randn(3 * 2, 4)  # rows g * B + b
    indices, offsets, mass = image_target_bags(layout, probs.device)
    targets = aggregate_targets(probs, indices, offsets).view(5, 2, 4)
    for v in range(5):
        for b in range(2):
            expected = sum(probs[g * 2 + b] for g in range(3) if g != v)
            torch.testing.assert_close(targets[v, b], expected)
    assert mass == [(6, 2.0), (4, 3.0)]


def test_region_target_bags_gather_matched_rows_of_every_other_teacher_crop():
    b, n, g = 2, 3, 2
    layout = infer_layout([1 * b, 2 * b], [g * b], n_global=g, n_crops=3)
    n_t = 4
    probs = torch.randn(g * b * n_t, 5)
    starts, tokens = torch.arange(g) * (b * n_t), torch.full((g,), n_t)
    for group, crops in ((0, 1), (1, 2)):
        matches = torch.randint(0, n_t, (crops, b, n, g))
        indices, offsets, _ = region_target_bags(matches, starts, tokens, layout, group)
        targets = aggregate_targets(probs, indices, offsets).view(crops, b, n, 5)
        first = layout.first_student_crop(group)
        for c in range(crops):
            for bi in range(b):
                for j in range(n):
                    rows = [int(starts[t]) + bi * n_t + int(matches[c, bi, j, t]) for t in range(g) if t != first + c]
                    torch.testing.assert_close(targets[c, bi, j], sum(probs[r] for r in rows))


def test_centered_probs_are_float32_flushed_and_equal_softmax():
    logits = torch.randn(6, 50).to(torch.bfloat16)
    center = torch.randn(1, 50)
    probs = centered_probs(logits, center, 0.04)
    assert probs.dtype == torch.float32 and not probs.requires_grad
    ref = F.softmax((logits.double() - center.double()) / 0.04, -1)
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-30)
    sharp = centered_probs(torch.tensor([[0.0, 10.0, 2.0]]), torch.zeros(1, 3), 0.04)  # exp(-250): below normal
    assert sharp[0, 0] == 0.0 and sharp[0, 2] == 0.0 and sharp[0, 1] == 1.0
