"""RegionDistillationLoss against EsViT's per-pair loop with explicit token matching (reference.py)."""

from __future__ import annotations

import pytest
import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses import RegionDistillationLoss
from cmd.losses.functional import match_regions
from tests.losses.reference import ReferenceCMD, as_float64, make_outputs


@pytest.mark.parametrize(
    ("batch", "n_global", "student_groups", "teacher_groups", "out_dim"),
    [
        (2, 2, [(2, 4), (3, 1)], [(2, 4)], 16),  # 2 + 3 crops, 4 / 1 tokens
        (3, 2, [(3, 4), (2, 2)], [(2, 4)], 8),  # a local crop at the global resolution
        (2, 1, [(1, 3), (2, 2)], [(1, 3)], 12),  # one global crop
        (1, 3, [(3, 2), (1, 2), (1, 1)], [(1, 2), (2, 2)], 8),  # three groups, teacher in two groups
    ],
)
def test_region_loss_equals_per_pair_loop_over_successive_calls(batch, n_global, student_groups, teacher_groups, out_dim):
    n_crops = sum(c for c, _ in student_groups)
    loss_fn = RegionDistillationLoss(out_dim, n_global, n_crops - n_global)
    ref = ReferenceCMD(out_dim, n_global, n_crops, image_weight=0.0, region_weight=1.0, inter_weight=0.0)
    for step, epoch in enumerate([0, 12, 31]):
        g = torch.Generator().manual_seed(step)
        s = make_outputs([c for c, _ in student_groups], batch, [n for _, n in student_groups], out_dim, 6, generator=g)
        t = make_outputs([c for c, _ in teacher_groups], batch, [n for _, n in teacher_groups], out_dim, 6, generator=g,
                         scale=1.0 + step)
        expected, _ = ref(as_float64(s), as_float64(t), epoch)
        loss = loss_fn(s, t, epoch)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.region_center.double(), ref.region_center, rtol=1e-5, atol=1e-6)


def test_region_loss_gradient_equals_reference():
    batch, out_dim = 2, 8
    s = make_outputs([2, 2], batch, [3, 2], out_dim, 5, requires_grad=True)
    t = make_outputs([2], batch, [3], out_dim, 5)
    loss_fn = RegionDistillationLoss(out_dim, 2, 2)
    loss_fn(s, t, 3).backward()
    s64 = as_float64(s, requires_grad=True)
    ref, _ = ReferenceCMD(out_dim, 2, 4, image_weight=0.0, region_weight=1.0, inter_weight=0.0)(s64, as_float64(t), 3)
    ref.backward()
    for ours, theirs in zip(s, s64):
        torch.testing.assert_close(ours.region.grad.double(), theirs.region.grad, rtol=1e-4, atol=1e-7)
        assert ours.features.grad is None  # no gradient through the matching
        assert ours.image.grad is None


def test_match_regions_equals_explicit_argmax_loops():
    b, c, g, n_s, n_t, d = 3, 2, 2, 4, 5, 7
    s, t = torch.randn(c * b, n_s, d), torch.randn(g * b, n_t, d)
    m = match_regions(s, t, b)
    assert m.shape == (c, b, n_s, g)
    for ci in range(c):
        for gi in range(g):
            for bi in range(b):
                for j in range(n_s):
                    fs = s[ci * b + bi, j] / s[ci * b + bi, j].norm()
                    sims = [float(fs @ (t[gi * b + bi, i] / t[gi * b + bi, i].norm())) for i in range(n_t)]
                    assert int(m[ci, bi, j, gi]) == max(range(n_t), key=sims.__getitem__)


def test_missing_fields_and_mismatched_shapes_raise():
    loss_fn = RegionDistillationLoss(8, 2, 1)
    s = make_outputs([3], 2, [2], 8, 4)
    t = make_outputs([2], 2, [2], 8, 4)
    no_features = [CrossLevelOutput(s[0].image, s[0].region)]
    with pytest.raises(ValueError, match=r"student\[0\]\.features is None"):
        loss_fn(no_features, t, 0)
    bad_dim = [CrossLevelOutput(t[0].image, t[0].region, torch.randn(4, 2, 5))]
    with pytest.raises(ValueError, match=r"teacher\[0\]\.features must have shape \[4, 2, 4\].*got \[4, 2, 5\]"):
        loss_fn(s, bad_dim, 0)
    with pytest.raises(TypeError, match="CrossLevelOutput"):
        loss_fn([s[0].image], t, 0)
    with pytest.raises(ValueError, match=r"3 crops x B=2 images = 6 rows"):
        loss_fn(make_outputs([2], 2, [2], 8, 4), t, 0)
