"""Property tests: the CMD loss (every term on) is finite with finite gradients and its KL terms are >= 0."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmd.heads.output import CrossLevelOutput
from cmd.losses import CMDLoss, DINOLoss

K, B, D = 16, 2, 4
FP16_MAX = 6.0e4  # inputs must be finite in the input dtype


def _logits(shape, mode, scale, generator, *, teacher):
    if mode == "equal":
        return torch.full(shape, scale)
    if mode == "onehot" and teacher:
        x = torch.zeros(shape)
        x[..., int(torch.randint(0, K, (1,), generator=generator))] = scale
        return x
    return (torch.randn(shape, generator=generator) * scale).clamp(-FP16_MAX, FP16_MAX)


def _outputs(crops_tokens, mode, scale, zero_weights, dtype, generator, *, teacher):
    outs = []
    for crops, n in crops_tokens:
        rows = crops * B
        image = _logits((rows, K), mode, scale, generator, teacher=teacher)
        region = _logits((rows, n, K), mode, scale, generator, teacher=teacher)
        features = torch.randn(rows, n, D, generator=generator)
        w = torch.softmax(torch.randn(rows, n, generator=generator), -1)
        if zero_weights:
            w[:, 1:] = 0.0  # all the mass on the first instance: the rest exactly 0
            w[:, 0] = 1.0
        # Logits and tokens in the low-precision dtype; the multi-instance weights come from a softmax,
        # which autocast runs in float32 (float16 could not even hold the derivative with respect to a
        # weight that is exactly 0 under the cross term, e.g. 2e9: the true value, not an overflow).
        tensors = [t.to(dtype) for t in (image, region, features)] + [w]
        if not teacher:
            for t in tensors:
                t.requires_grad_()
        outs.append(CrossLevelOutput(*tensors))
    return outs


@settings(max_examples=25, deadline=None)
@given(
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    mode=st.sampled_from(["random", "equal", "onehot"]),
    zero_weights=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    epoch=st.integers(0, 400),
    seed=st.integers(0, 2**16),
    centering=st.sampled_from(["center", "sinkhorn"]),
)
def test_cmd_loss_is_finite_and_kl_terms_non_negative(scale, mode, zero_weights, dtype, epoch, seed, centering):
    g = torch.Generator().manual_seed(seed)
    student = _outputs([(2, 3), (2, 2)], mode, scale, zero_weights, dtype, g, teacher=False)
    teacher = _outputs([(2, 3)], mode, scale, zero_weights, dtype, g, teacher=True)
    loss_fn = CMDLoss(K, n_global_crops=2, n_local_crops=2, swapped_weight=0.3, centering=centering)
    loss_fn.center.value.normal_(generator=g)
    out = loss_fn(student, teacher, epoch)
    assert torch.isfinite(out.loss), out.terms
    for name, value in out.terms.items():
        assert torch.isfinite(value) or name == "koleo", name
    for name in ("inter_level", "inter_level_teacher", "teacher_student_kl"):
        assert out.terms[name] >= -1e-5, (name, out.terms[name])
    out.loss.backward()
    for o in student:
        for name in ("image", "region", "mil_weights"):
            grad = getattr(o, name).grad
            assert grad is not None and torch.isfinite(grad.float()).all(), name
    assert torch.isfinite(loss_fn.center.value).all() and torch.isfinite(loss_fn.region_center.value).all()


@settings(max_examples=20, deadline=None)
@given(
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_dino_loss_is_finite_and_not_below_the_teacher_entropy(scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(4 * B, K, generator=g) * scale).clamp(-FP16_MAX, FP16_MAX).to(dtype).requires_grad_()
    t = (torch.randn(2 * B, K, generator=g) * scale).clamp(-FP16_MAX, FP16_MAX).to(dtype)
    loss = DINOLoss(K, n_local_crops=2)(s, t, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss >= -1e-6  # a cross-entropy is >= 0
    assert torch.isfinite(s.grad.float()).all()
