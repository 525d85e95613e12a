"""Schedules: DINO's cosine schedule, the teacher temperature and the lr scaling rule, against loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmd.schedules import EpochSchedule, cosine_schedule, cosine_value, scale_lr, teacher_temperature_schedule


def _reference_cosine(base, final, epochs, iters, warmup_epochs, start):
    """method.md section 4, written out one iteration at a time."""
    warmup_iters = warmup_epochs * iters
    values = []
    for i in range(warmup_iters):  # linspace(start, base, warmup_iters)
        values.append(start + (base - start) * i / (warmup_iters - 1) if warmup_iters > 1 else start)
    n = epochs * iters - warmup_iters
    for i in range(n):
        values.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)))
    return values


def test_issue_values():
    s = cosine_schedule(1e-3, 1e-6, epochs=10, iters_per_epoch=5, warmup_epochs=2)
    assert s.shape == (50,) and s.dtype == np.float64
    assert s[0] == 0.0
    assert s[1] == pytest.approx(1.1111111e-4, rel=1e-7)
    assert s[9] == pytest.approx(1e-3)  # end of the warm-up reaches base
    assert s[10] == 1e-3
    assert s[49] == pytest.approx(2.5397918e-6, rel=1e-7)
    assert s[49] > 1e-6  # close to, not equal to, final


@pytest.mark.parametrize(
    ("epochs", "iters", "warmup", "start"),
    [(10, 5, 2, 0.0), (10, 5, 0, 0.0), (3, 4, 3, 1e-4), (1, 1, 0, 0.0), (1, 1, 1, 0.5), (7, 3, 1, 2e-5)],
)
def test_matches_loop(epochs, iters, warmup, start):
    got = cosine_schedule(0.004, 1e-5, epochs, iters, warmup_epochs=warmup, start_warmup_value=start)
    want = _reference_cosine(0.004, 1e-5, epochs, iters, warmup, start)
    assert len(got) == epochs * iters
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_no_warmup_starts_at_base_and_full_warmup_is_linear():
    s = cosine_schedule(0.996, 1.0, epochs=4, iters_per_epoch=5)
    assert s[0] == 0.996 and np.all(np.diff(s) > 0)
    w = cosine_schedule(1.0, 0.0, epochs=4, iters_per_epoch=5, warmup_epochs=4, start_warmup_value=0.5)
    np.testing.assert_allclose(w, np.linspace(0.5, 1.0, 20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0, "iters_per_epoch": 5}, "epochs"),
        ({"epochs": 2, "iters_per_epoch": 0}, "iters_per_epoch"),
        ({"epochs": 2, "iters_per_epoch": 5, "warmup_epochs": 3}, "warmup_epochs"),
        ({"epochs": 2, "iters_per_epoch": 5, "warmup_epochs": -1}, "warmup_epochs"),
    ],
)
def test_cosine_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(1.0, 0.0, **kwargs)
    with pytest.raises(TypeError, match="epochs"):
        cosine_schedule(1.0, 0.0, 2.5, 3)


def test_cosine_value_matches_schedule_and_holds_final():
    total = 17
    s = cosine_schedule(0.996, 1.0, 1, total)
    assert [cosine_value(0.996, 1.0, i, total) for i in range(total)] == pytest.approx(list(s), abs=1e-15)
    assert cosine_value(0.996, 1.0, total, total) == 1.0
    assert cosine_value(0.996, 1.0, 10 * total, total) == 1.0


def _dino_teacher_temp_table(warmup, final, warmup_epochs, n_epochs):
    """DINO's formula (main_dino.py / DINOLoss), written out: defined for epochs < n_epochs."""
    return np.concatenate((np.linspace(warmup, final, warmup_epochs), np.ones(n_epochs - warmup_epochs) * final))


@pytest.mark.parametrize(("warmup_epochs", "n_epochs"), [(30, 100), (30, 30), (0, 5), (1, 3), (2, 2), (10, 300)])
def test_teacher_temperature_schedule_equals_dino_formula_and_holds_final(warmup_epochs, n_epochs):
    t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=warmup_epochs)
    table = _dino_teacher_temp_table(0.04, 0.07, warmup_epochs, n_epochs)
    assert [t[e] for e in range(n_epochs)] == pytest.approx(list(table), abs=1e-15)
    assert t[n_epochs] == 0.07 and t[10**6] == 0.07  # past DINO's table: the final value
    assert t(3) == t[3] and isinstance(t[3], float)


def test_teacher_temperature_schedule_is_the_losses_schedule():
    from cmd.losses import CMDLoss

    loss = CMDLoss.from_preset("dino", out_dim=4, warmup_teacher_temp_epochs=30)
    t = teacher_temperature_schedule(0.04, 0.07, 30)
    # the issue's example: warm-up 30, a 10-epoch run: epochs 10 / 20 / 40 follow DINO's ramp
    assert [loss.teacher_temperature(e) for e in (10, 20, 40)] == [t[10], t[20], t[40]]
    assert t[10] == pytest.approx(0.04 + 0.03 * 10 / 29) and t[40] == 0.07


def test_teacher_temperature_edges():
    with pytest.raises(ValueError, match="warmup"):
        teacher_temperature_schedule(0.0, 0.07, 3)
    with pytest.raises(TypeError):
        teacher_temperature_schedule(0.04, 0.07, 3, 10)  # no run length: the schedule does not need one
    t = teacher_temperature_schedule(0.04, 0.07, 3)
    with pytest.raises(ValueError, match="epoch"):
        t[-1]
    with pytest.raises(TypeError, match="epoch"):
        t[1.5]
    with pytest.raises(ValueError, match="non-empty"):
        EpochSchedule([])


def test_scale_lr():
    assert scale_lr(5e-4, 256) == 5e-4
    assert scale_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert scale_lr(1e-3, 64, reference_batch=32) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="total_batch"):
        scale_lr(5e-4, 0)
