"""The region-level term alone (CMDLoss with region_weight=1) against EsViT's per-pair loop (reference.py)."""

from __future__ import annotations

import pytest
import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses import CMDLoss
from cmd.losses.functional import match_regions
from tests.losses.reference import ReferenceCMD, as_float64, make_outputs


@pytest.mark.parametrize(
    ("batch", "n_global", "student_groups", "teacher_groups", "out_dim"),
    [
        (2, 2, [(2, 4), (3, 1)], [(2, 4)], 16),  # 2 + 3 crops, 4 / 1 tokens
        (3, 2, [(3, 4), (2, 2)], [(2, 4)], 8),  # a local crop at the global resolution
        (2, 1, [(1, 3), (2, 2)], [(1, 3)], 12),  # one global crop
        (1, 3, [(3, 2), (1, 2), (1, 1)], [(3, 2)], 8),  # three student groups
    ],
)
def test_region_loss_equals_per_pair_loop_over_successive_calls(batch, n_global, student_groups, teacher_groups, out_dim):
    n_crops = sum(c for c, _ in student_groups)
    loss_fn = _region_loss(out_dim, n_global, n_crops - n_global)
    ref = ReferenceCMD(out_dim, n_global, n_crops, image_weight=0.0, region_weight=1.0, inter_weight=0.0)
    for step, epoch in enumerate([0, 12, 31]):
        g = torch.Generator().manual_seed(step)
        s = make_outputs([c for c, _ in student_groups], batch, [n for _, n in student_groups], out_dim, 6, generator=g)
        t = make_outputs([c for c, _ in teacher_groups], batch, [n for _, n in teacher_groups], out_dim, 6, generator=g,
                         scale=1.0 + step)
        expected, _ = ref(as_float64(s), as_float64(t), epoch)
        loss = loss_fn(s, t, epoch).loss
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.region_center.value.double(), ref.region_center, rtol=1e-5, atol=1e-6)


def test_region_loss_gradient_equals_reference():
    batch, out_dim = 2, 8
    s = make_outputs([2, 2], batch, [3, 2], out_dim, 5, requires_grad=True)
    t = make_outputs([2], batch, [3], out_dim, 5)
    loss_fn = _region_loss(out_dim, 2, 2)
    loss_fn(s, t, 3).loss.backward()
    s64 = as_float64(s, requires_grad=True)
    ref, _ = ReferenceCMD(out_dim, 2, 4, image_weight=0.0, region_weight=1.0, inter_weight=0.0)(s64, as_float64(t), 3)
    ref.backward()
    for ours, theirs in zip(s, s64):
        torch.testing.assert_close(ours.region.grad.double(), theirs.region.grad, rtol=1e-4, atol=1e-7)
        assert ours.tokens.grad is None  # no gradient through the matching
        assert ours.image.grad is None or not ours.image.grad.any()  # lambda_I = 0


def test_match_regions_equals_explicit_argmax_loops():
    b, c, g, n_s, n_t, d = 3, 2, 2, 4, 5, 7
    s, t = torch.randn(c * b, n_s, d), torch.randn(g * b, n_t, d)
    m, finite = match_regions(s, t, b)
    assert bool(finite) and m.shape == (c, b, n_s, g)
    for ci in range(c):
        for gi in range(g):
            for bi in range(b):
                for j in range(n_s):
                    fs = s[ci * b + bi, j] / s[ci * b + bi, j].norm()
                    sims = [float(fs @ (t[gi * b + bi, i] / t[gi * b + bi, i].norm())) for i in range(n_t)]
                    assert int(m[ci, bi, j, gi]) == max(range(n_t), key=sims.__getitem__)


def test_missing_fields_and_mismatched_shapes_raise():
    loss_fn = _region_loss(8, 2, 1)
    s = make_outputs([3], 2, [2], 8, 4)
    t = make_outputs([2], 2, [2], 8, 4)
    no_features = [CrossLevelOutput(s[0].image, s[0].region)]
    with pytest.raises(ValueError, match=r"student\[0\]\.tokens is None"):
        loss_fn(no_features, t, 0)
    bad_dim = [CrossLevelOutput(t[0].image, t[0].region, torch.randn(4, 2, 5))]
    with pytest.raises(ValueError, match=r"teacher\.tokens must have shape \[4, 2, 5\].*got \[4, 2, 4\]|student\[0\]\.tokens must have shape \[6, 2, 5\]"):
        loss_fn(s, bad_dim, 0)
    with pytest.raises(TypeError, match="CrossLevelOutput"):
        loss_fn([s[0].image], t, 0)
    two_teacher_groups = t[0].split(2)
    with pytest.raises(TypeError, match="one CrossLevelOutput of the G global crops"):
        loss_fn(s, two_teacher_groups, 0)  # a teacher over several groups is not supported
    with pytest.raises(ValueError, match="first student group must start with the 2 global crops"):
        loss_fn(s[0].split(3), t, 0)  # global crops across student groups
    with pytest.raises(ValueError, match=r"3 crops x B=2 images = 6 rows"):
        loss_fn(make_outputs([2], 2, [2], 8, 4), t, 0)


def _region_loss(out_dim, n_global, n_local):
    return CMDLoss(out_dim, n_global_crops=n_global, n_local_crops=n_local, image_weight=0.0, region_weight=1.0,
                   inter_weight=0.0)
