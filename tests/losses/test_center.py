"""Center, Sinkhorn-Knopp, the collapse signals and the loss-level guards (non-finite inputs, no active term)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmd.heads.output import CrossLevelOutput
from cmd.losses import Center, CMDLoss, diagnose_collapse, sinkhorn_knopp
from tests.losses.reference import make_outputs


def sinkhorn_reference(logits: torch.Tensor, tau: float, n_iterations: int) -> torch.Tensor:
    """SwAV / DINOv2 Sinkhorn-Knopp written out in float64: Q [K, R] = exp(x / tau), mass 1, then rows / K, columns / R."""
    q = (logits.double() / tau).exp().t()
    k, r = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        for i in range(k):
            q[i] = q[i] / q[i].sum() / k
        for j in range(r):
            q[:, j] = q[:, j] / q[:, j].sum() / r
    return (q * r).t()


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
def test_sinkhorn_equals_reference(n_iterations):
    logits = torch.randn(12, 7, generator=torch.Generator().manual_seed(n_iterations)) * 2
    q = sinkhorn_knopp(logits, 0.5, n_iterations)
    torch.testing.assert_close(q.double(), sinkhorn_reference(logits, 0.5, n_iterations), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.sum(-1), torch.ones(12))
    assert q.dtype == torch.float32 and not q.requires_grad


def test_sinkhorn_is_finite_for_huge_logits_and_balances_prototypes():
    for scale in (30.0, 1e4):  # log-space: no sample loses its mass to underflow
        q = sinkhorn_knopp(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * scale, 0.04, 3)
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q.sum(-1), torch.ones(16))
    collapsed = torch.zeros(32, 8)
    collapsed[:, 0] = 5.0  # every sample on prototype 0: centering would follow; Sinkhorn spreads them
    spread = sinkhorn_knopp(collapsed + 0.01 * torch.randn(32, 8), 0.1, 3).mean(0)
    assert spread.max() < 0.2


def test_loss_with_sinkhorn_uses_sinkhorn_targets_for_both_levels():
    s = make_outputs([2, 2], 2, [3, 2], 8, 5)
    t = make_outputs([2], 2, [3], 8, 5)
    loss_fn = CMDLoss.from_preset("esvit", out_dim=8, n_local_crops=2, centering="sinkhorn")
    out = loss_fn(s, t, 0)
    p = sinkhorn_reference(t[0].image, 0.04, 3).float()
    log_p = [F.log_softmax(x / 0.1, -1) for x in torch.cat([o.image for o in s]).split(2)]
    pairs = [-(p[g * 2 : g * 2 + 2] * log_p[v]).sum(-1).mean() for g in range(2) for v in range(4) if v != g]
    torch.testing.assert_close(out.terms["image"], torch.stack(pairs).mean(), rtol=1e-5, atol=1e-5)
    assert torch.all(loss_fn.center.value == 0)  # the centers are not used with Sinkhorn
    q = sinkhorn_reference(t[0].region.reshape(-1, 8), 0.04, 3)
    ent = -torch.special.xlogy(q, q).sum(-1).mean()
    torch.testing.assert_close(out.terms["teacher_region_entropy"].double(), ent, rtol=1e-4, atol=1e-5)


def test_center_update_skips_a_non_finite_batch():
    """issue 15 #9: a NaN teacher logit used to poison the center for good."""
    center = Center(4, momentum=0.5)
    center.accumulate(torch.ones(2, 4))
    center.update()
    bad = torch.ones(2, 4)
    bad[0, 1] = float("nan")
    center.accumulate(bad)
    center.update()
    torch.testing.assert_close(center.value, torch.full((1, 4), 0.5))  # unchanged by the NaN batch
    center.accumulate(torch.full((3, 4), 2.0))
    center.update()
    torch.testing.assert_close(center.value, torch.full((1, 4), 1.25))
    loss_fn = CMDLoss.from_preset("cmd", out_dim=8, n_local_crops=2)
    s, t = make_outputs([2, 2], 2, [3, 2], 8, 5), make_outputs([2], 2, [3], 8, 5)
    t[0].image[0, 0] = float("nan")
    t[0].region[0, 0, 0] = float("inf")
    loss_fn(s, t, 0)
    assert torch.isfinite(loss_fn.center.value).all() and torch.isfinite(loss_fn.region_center.value).all()


def test_non_finite_tokens_do_not_give_a_finite_loss():
    """issue 15 #9: NaN in the backbone tokens only reached the argmax matching: a silently finite loss."""
    s, t = make_outputs([2, 2], 2, [3, 2], 8, 5), make_outputs([2], 2, [3], 8, 5)
    s[1].tokens[0, 0, 0] = float("nan")
    out = CMDLoss.from_preset("cmd", out_dim=8, n_local_crops=2)(s, t, 0)
    assert torch.isnan(out.loss) and torch.isnan(out.terms["region"])
    with pytest.raises(ValueError, match=r"student\[1\]\.tokens holds 1 non-finite"):
        CMDLoss.from_preset("cmd", out_dim=8, n_local_crops=2, validate=True)(s, t, 0)


def test_a_loss_without_an_active_term_is_refused():
    """issue 15 #10: all weights 0 gave a loss of 0.0."""
    with pytest.raises(ValueError, match="no active term"):
        CMDLoss.from_preset("cmd", out_dim=8, image_weight=0, region_weight=0, inter_weight=0, swapped_weight=0)


def test_collapse_signals_and_diagnosis():
    k, b = 64, 8
    loss_fn = CMDLoss.from_preset("dino", out_dim=k, n_local_crops=1)
    student = CrossLevelOutput(torch.randn(3 * b, k))
    uniform = loss_fn(student, CrossLevelOutput(torch.zeros(2 * b, k)), teacher_temp=0.04).terms
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    assert uniform["teacher_batch_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    one_hot = torch.zeros(2 * b, k)
    one_hot[:, 3] = 10.0
    loss_fn = CMDLoss.from_preset("dino", out_dim=k, n_local_crops=1)
    collapsed = loss_fn(student, CrossLevelOutput(one_hot), teacher_temp=0.04).terms
    assert collapsed["teacher_entropy"] < 1e-3 and collapsed["teacher_batch_entropy"] < 1e-3
    healthy = torch.eye(k)[: 2 * b] * 10.0  # each sample sharp, on different prototypes
    loss_fn = CMDLoss.from_preset("dino", out_dim=k, n_local_crops=1)
    fine = loss_fn(student, CrossLevelOutput(healthy), teacher_temp=0.04).terms
    assert fine["teacher_entropy"] < 1e-3 and fine["teacher_batch_entropy"] == pytest.approx(math.log(2 * b), rel=1e-4)
    p = torch.softmax(healthy / 0.04, -1)
    kl = [(p[g * b : (g + 1) * b] * (p[g * b : (g + 1) * b].clamp_min(1e-30).log()
                                     - F.log_softmax(x / 0.1, -1))).sum(-1).mean()
          for g in range(2) for v, x in enumerate(student.image.split(b)) if v != g]
    torch.testing.assert_close(fine["teacher_student_kl"], torch.stack(kl).mean(), rtol=1e-4, atol=1e-4)
    assert diagnose_collapse(float(uniform["teacher_entropy"]), float(uniform["teacher_batch_entropy"]), k) == "uniform"
    assert diagnose_collapse(float(collapsed["teacher_entropy"]), float(collapsed["teacher_batch_entropy"]), k) == "one_hot"
    assert diagnose_collapse(float(fine["teacher_entropy"]), float(fine["teacher_batch_entropy"]), k) is None


def test_koleo_term_in_the_loss():
    b, k, d = 4, 8, 6
    s = [CrossLevelOutput(torch.randn(3 * b, k), pooled=torch.randn(3 * b, d, requires_grad=True))]
    t = CrossLevelOutput(torch.randn(2 * b, k))
    loss_fn = CMDLoss.from_preset("dino", out_dim=k, n_local_crops=1, koleo_weight=0.1)
    assert "pooled" in loss_fn.student_outputs
    out = loss_fn(s, t, 0)
    from cmd.losses import koleo

    expected = (koleo(s[0].pooled[:b]) + koleo(s[0].pooled[b : 2 * b])) / 2
    torch.testing.assert_close(out.terms["koleo"], expected.detach())
    out.loss.backward()
    assert s[0].pooled.grad[: 2 * b].abs().sum() > 0 and (s[0].pooled.grad[2 * b :] == 0).all()
    with pytest.raises(ValueError, match=r"student\[0\]\.pooled is None, but koleo_weight > 0"):
        loss_fn([CrossLevelOutput(s[0].image)], t, 0)
