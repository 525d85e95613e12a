"""DINOLoss against DINO's per-pair loop (tests/losses/reference.py), centers, schedule and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmd.losses import DINOLoss
from cmd.schedules import teacher_temperature_schedule
from tests.losses.reference import reference_dino, reference_teacher_temp


@pytest.mark.parametrize(
    ("batch", "n_global", "n_crops", "out_dim", "epochs"),
    [
        (3, 2, 10, 32, [0, 1, 2]),
        (2, 2, 4, 64, [28, 29, 30, 31]),
        (4, 1, 3, 16, [5, 99, 100, 250]),  # past n_epochs: the final temperature
        (1, 3, 5, 8, [0, 10, 40]),
    ],
)
def test_dino_loss_equals_per_pair_loop_over_successive_calls(batch, n_global, n_crops, out_dim, epochs):
    loss_fn = DINOLoss(out_dim, n_global_crops=n_global, n_local_crops=n_crops - n_global)
    center = torch.zeros(1, out_dim, dtype=torch.float64)
    for step, epoch in enumerate(epochs):
        student = torch.randn(n_crops * batch, out_dim) * (1 + step)
        teacher = torch.randn(n_global * batch, out_dim) * 2 + step  # a drifting mean moves the center
        ref, center = reference_dino(student, teacher, center, n_crops, epoch, n_global=n_global)
        loss = loss_fn(student, teacher, epoch)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.center.value.double(), center, rtol=1e-5, atol=1e-6)


def test_dino_loss_gradient_equals_reference_autograd():
    n_crops, batch, out_dim = 6, 3, 24
    loss_fn = DINOLoss(out_dim, n_local_crops=n_crops - 2)
    loss_fn.center.value.normal_()
    student = torch.randn(n_crops * batch, out_dim, requires_grad=True)
    teacher = torch.randn(2 * batch, out_dim)
    loss_fn(student, teacher, epoch=7, update_centers=False).backward()
    ref_student = student.detach().double().requires_grad_()
    ref, _ = reference_dino(ref_student, teacher, loss_fn.center.value.double(), n_crops, 7)
    ref.backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-7)


def test_grouped_student_input_equals_one_tensor():
    batch, out_dim = 2, 16
    s = torch.randn(6 * batch, out_dim)
    t = torch.randn(2 * batch, out_dim)
    a = DINOLoss(out_dim, n_local_crops=4)(s, t, 0)
    b = DINOLoss(out_dim, n_local_crops=4)([s[: 2 * batch], s[2 * batch :]], [t], 0)
    torch.testing.assert_close(a, b)


def test_teacher_temperature_matches_numpy_schedule_and_continues_past_n_epochs():
    table = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    loss_fn = DINOLoss(8)
    for epoch in range(100):
        assert loss_fn.teacher_temperature(epoch) == pytest.approx(float(table[epoch]), abs=1e-15)
    assert loss_fn.teacher_temperature(10_000) == 0.07 == teacher_temperature_schedule(0.04, 0.07, 30)[10_000]
    assert DINOLoss(8, warmup_teacher_temp_epochs=1).teacher_temperature(0) == 0.04
    assert DINOLoss(8, warmup_teacher_temp_epochs=0).teacher_temperature(0) == 0.07
    assert reference_teacher_temp(300) == 0.07
    with pytest.raises(ValueError, match="epoch"):
        loss_fn(torch.randn(20, 8), torch.randn(4, 8), -1)
    with pytest.raises(TypeError, match="epoch"):
        loss_fn(torch.randn(20, 8), torch.randn(4, 8), 1.5)
    s, t = torch.randn(20, 8), torch.randn(4, 8)
    explicit = loss_fn(s, t, teacher_temp=float(table[7]), update_centers=False)
    torch.testing.assert_close(explicit, loss_fn(s, t, 7, update_centers=False))
    with pytest.raises(TypeError, match="exactly one"):
        loss_fn(s, t)


def test_shape_errors_state_expected_and_received_shapes():
    loss_fn = DINOLoss(16, n_local_crops=2)
    with pytest.raises(ValueError, match=r"4 crops x B=3 images = 12 rows.*got 10 rows"):
        loss_fn(torch.randn(10, 16), torch.randn(6, 16), 0)
    with pytest.raises(ValueError, match=r"multiple of 2 rows; got 5"):
        loss_fn(torch.randn(12, 16), torch.randn(5, 16), 0)
    with pytest.raises(ValueError, match=r"student\[0\]\.image must have shape \[\*, 16\].*got \[12, 8\]"):
        loss_fn(torch.randn(12, 8), torch.randn(6, 16), 0)
    with pytest.raises(TypeError, match="student_output"):
        loss_fn("not a tensor", torch.randn(6, 16), 0)
    with pytest.raises(ValueError, match="at least 2 crops"):
        DINOLoss(16, n_global_crops=1, n_local_crops=0)
    with pytest.raises(TypeError):
        DINOLoss(16, 4)  # crop counts are keyword-only (the former positional n_crops)
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(16, n_local_crops=2, student_temp=0.0)


def test_validate_names_the_non_finite_tensor():
    loss_fn = DINOLoss(8, n_global_crops=1, n_local_crops=2, validate=True)
    s, t = torch.randn(6, 8), torch.randn(2, 8)
    t[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"teacher\.image holds 1 non-finite"):
        loss_fn(s, t, 0)


def test_low_precision_and_autocast_inputs_are_computed_in_float32():
    loss_fn = DINOLoss(32, n_global_crops=2, n_local_crops=2)
    s, t = torch.randn(4 * 3, 32) * 5, torch.randn(2 * 3, 32) * 5
    ref = loss_fn(s, t, 0, update_centers=False)
    for dtype in (torch.bfloat16, torch.float16):
        low = loss_fn(s.to(dtype), t.to(dtype), 0, update_centers=False)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss_fn(s, t, 0, update_centers=False)
    torch.testing.assert_close(auto, ref)
    s16 = s.to(torch.bfloat16).requires_grad_()
    loss_fn(s16, t, 0, update_centers=False).backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


def test_center_is_in_state_dict_and_resume_continues_exactly():
    a = DINOLoss(8, n_global_crops=1, n_local_crops=2)
    for epoch in range(3):
        a(torch.randn(6, 8), torch.randn(2, 8) + 1, epoch)
    assert set(a.state_dict()) == {"center.value", "region_center.value"}
    b = DINOLoss(8, n_global_crops=1, n_local_crops=2)
    b.load_state_dict(a.state_dict())
    s, t = torch.randn(6, 8), torch.randn(2, 8)
    torch.testing.assert_close(a(s, t, 3), b(s, t, 3))
    torch.testing.assert_close(a.center.value, b.center.value)
    legacy = DINOLoss(8, n_global_crops=1, n_local_crops=2)  # a checkpoint of the former layout
    legacy.load_state_dict({"center": a.center.value.clone(), "region_center": torch.zeros(1, 8)})
    torch.testing.assert_close(legacy.center.value, a.center.value)


def test_accumulated_center_update_equals_one_update_on_the_whole_batch():
    t1, t2 = torch.randn(4, 8), torch.randn(6, 8) + 3
    a = DINOLoss(8, n_global_crops=2, n_local_crops=1)
    a.update_centers(torch.cat([t1, t2]))
    b = DINOLoss(8, n_global_crops=2, n_local_crops=1)
    b(torch.randn(6, 8), t1, 0, update_centers=False)
    assert torch.all(b.center.value == 0)  # no update yet
    b.accumulate_centers(t1)
    b.accumulate_centers(t2)
    b.update_centers()
    torch.testing.assert_close(a.center.value, b.center.value)
    before = b.center.value.clone()
    b.update_centers()  # nothing pending: unchanged
    torch.testing.assert_close(b.center.value, before)


def test_teacher_gets_no_gradient():
    s = torch.randn(4 * 2, 8, requires_grad=True)
    t = torch.randn(2 * 2, 8, requires_grad=True)
    DINOLoss(8, n_local_crops=2)(s, t, 0).backward()
    assert t.grad is None and s.grad is not None
