"""EMA teacher: against a per-parameter loop, buffers, wrappers, schedule, mismatches, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cmd.schedules import cosine_schedule
from cmd.teacher import EMATeacher, update_teacher


class TinyNet(nn.Module):
    def __init__(self, width: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Sequential(nn.Linear(width, 5), nn.GELU(), nn.Linear(5, 4, bias=False))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        h = self.bn(self.conv(x)).mean(dim=(2, 3))
        return self.head(h) * self.scale


def _perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def _reference_update(teacher: nn.Module, student: nn.Module, m: float) -> dict[str, torch.Tensor]:
    """The straightforward update, one parameter at a time, on copies."""
    s_params = dict(student.named_parameters())
    out = {
        name: m * p.detach().clone() + (1 - m) * s_params[name].detach()
        for name, p in teacher.named_parameters()
    }
    out.update({name: b.clone() for name, b in student.named_buffers()})
    return out


@pytest.mark.parametrize("m", [0.0, 0.5, 0.996, 0.9999, 1.0])
def test_update_matches_per_parameter_loop(m):
    student = TinyNet()
    teacher = copy.deepcopy(student)
    _perturb(student)
    student.train()(torch.randn(4, 3, 8, 8))  # moves the BatchNorm statistics
    want = _reference_update(teacher, student, m)
    update_teacher(teacher, student, m)
    got = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name].detach(), value, rtol=1e-6, atol=1e-6, msg=name)
    assert teacher.bn.num_batches_tracked.item() == 1  # buffers reach the teacher


def test_momentum_one_leaves_teacher_bitwise_unchanged_and_zero_copies():
    student, teacher = TinyNet(), TinyNet()
    before = copy.deepcopy(teacher.state_dict())
    update_teacher(teacher, student, 1.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name])
    update_teacher(teacher, student, 0.0)
    for (name, p), s in zip(teacher.named_parameters(), student.parameters()):
        assert torch.equal(p, s), name


def test_matches_by_name_not_position():
    class AB(nn.Module):
        def __init__(self, order):
            super().__init__()
            for name in order:
                self.add_module(name, nn.Linear(3, 3))

    student, teacher = AB("ab"), AB("ba")  # same names and shapes, opposite registration order
    _perturb(student)
    want = {name: 0.25 * teacher.get_parameter(name) + 0.75 * p for name, p in student.named_parameters()}
    update_teacher(teacher, student, 0.25)
    for name, value in want.items():
        torch.testing.assert_close(teacher.get_parameter(name), value, rtol=1e-6, atol=1e-6, msg=name)


def test_mismatched_structures_raise_listing_names():
    student = TinyNet()
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"conv\.weight.*") as info:
        update_teacher(other, student, 0.9)
    assert "0.weight" in str(info.value) and "head.0.bias" in str(info.value)
    wider = TinyNet(width=7)
    with pytest.raises(
        ValueError, match=r"shape: conv\.weight \(teacher \(7, 3, 3, 3\), student \(6, 3, 3, 3\)\)"
    ):
        update_teacher(wider, student, 0.9)
    with pytest.raises(TypeError, match="dtype"):
        update_teacher(TinyNet().double(), student, 0.9)
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(TinyNet(), student, 1.5)
    with pytest.raises(ValueError, match="same module"):
        update_teacher(student, student, 0.9)


@pytest.mark.slow  # importing torch._dynamo for torch.compile takes ~5 s
def test_wrapped_student_is_unwrapped():
    student = TinyNet()
    teacher = copy.deepcopy(student)
    _perturb(student)
    compiled = torch.compile(student)  # lazily compiled: never run here
    want = _reference_update(teacher, student, 0.7)
    update_teacher(teacher, compiled, 0.7)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=1e-6, atol=1e-6)
    ema = EMATeacher(torch.compile(student))
    assert type(ema.teacher) is TinyNet


def test_ema_teacher_copy_schedule_and_counter():
    student = TinyNet()
    ema = EMATeacher(student, momentum=0.99, final_momentum=1.0, total_steps=8)
    assert ema.teacher is not student
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    for (_, t), s in zip(ema.teacher.named_parameters(), student.parameters()):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()
    student.eval()
    assert ema.teacher.training  # the teacher's mode is its own

    schedule = cosine_schedule(0.99, 1.0, 1, 8)
    used = []
    for _ in range(10):
        _perturb(student)
        used.append(ema.update(student))
    assert ema.step == 10
    assert used[:8] == pytest.approx(list(schedule), abs=1e-15)
    assert used[8:] == [1.0, 1.0]  # past the end: the final momentum
    assert ema.update(student, momentum=0.5) == 0.5 and ema.step == 11


def test_ema_constant_momentum_and_call():
    student = TinyNet()
    ema = EMATeacher(student, momentum=0.9)
    assert ema.momentum_at(0) == ema.momentum_at(10**6) == 0.9
    x = torch.randn(2, 3, 8, 8)
    ema.teacher.eval()
    student.eval()
    torch.testing.assert_close(ema(x), student(x))
    with pytest.raises(ValueError, match="total_steps"):
        EMATeacher(student, total_steps=0)
    with pytest.raises(ValueError, match="final_momentum"):
        EMATeacher(student, final_momentum=-0.1)


def test_ema_state_dict_resumes_the_schedule():
    student = TinyNet()
    a = EMATeacher(student, momentum=0.996, total_steps=20)
    for _ in range(7):
        a.update(student)
    b = EMATeacher(student, momentum=0.5, total_steps=3)
    b.load_state_dict(a.state_dict())
    assert b.step == 7 and b.total_steps == 20 and b.momentum == 0.996
    assert [b.update(student) for _ in range(3)] == [a.update(student) for _ in range(3)]
    with pytest.raises(ValueError, match="EMATeacher state"):
        b.load_state_dict({"teacher.weight": torch.zeros(1)})


def test_update_refuses_nan_or_inf_student_weights_and_names_them():
    """Issue 15 item 9: a NaN student weight used to be copied into the teacher."""
    import pytest

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ema = EMATeacher(student, momentum=0.5)
    before = {k: v.clone() for k, v in ema.teacher.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            student[2].weight[1, 3] = bad
        with pytest.raises(FloatingPointError, match=r"non-finite .*: 2\.weight; the teacher was not updated"):
            ema.update(student)
        assert ema.step == 0
        assert all(torch.equal(before[k], v) for k, v in ema.teacher.state_dict().items())
    with torch.no_grad():
        student[2].weight[1, 3] = 0.0
        student[1].running_var[0] = float("nan")  # a buffer, copied as is: checked too
    with pytest.raises(FloatingPointError, match=r"1\.running_var"):
        ema.update(student)
    # opting out copies what the student holds
    unchecked = EMATeacher(student, momentum=0.5, check_finite=False)
    unchecked.update(student)
    assert torch.isnan(unchecked.teacher[1].running_var[0])


def test_finite_check_has_no_false_alarm_for_large_half_precision_weights():
    student = torch.nn.Linear(64, 64).half()  # 2-norm accumulated in float32
    with torch.no_grad():
        student.weight.fill_(60000.0)  # a float16 2-norm would overflow
    ema = EMATeacher(student, momentum=0.9)
    ema.update(student)
    assert torch.isfinite(ema.teacher.weight).all()
    big = torch.nn.Linear(64, 64)
    with torch.no_grad():
        big.weight.fill_(1e30)  # finite, but its float32 2-norm overflows: checked one by one, accepted
    EMATeacher(big, momentum=0.9).update(big)


# ------------------------------------------------------------ no stochastic depth in the teacher (issue 22 item 4)
def _tiny_swin(drop_path_rate: float) -> nn.Module:
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=32,
                             window_size=4, embed_dim=24, depths=(1, 2), num_heads=(1, 2),
                             drop_path_rate=drop_path_rate)


@pytest.mark.parametrize("make", ["swin", "vit"])
def test_teacher_has_no_stochastic_depth_but_the_same_weights(make):
    import cmd

    torch.manual_seed(0)
    if make == "swin":
        student = _tiny_swin(0.1)
    else:  # the library's backbone wrapper around a timm ViT
        student = cmd.create_backbone("vit_tiny", depth=3, patch_size=8, embed_dim=48, num_heads=3,
                                      drop_path_rate=0.1)
    ema = EMATeacher(student)
    teacher = ema.teacher
    student.train()
    teacher.train()
    x = torch.randn(4, 3, 32, 32)

    def forward(model):
        out = model(x)
        return out.pooled if hasattr(out, "pooled") else out

    with torch.no_grad():
        t1, t2 = forward(teacher), forward(teacher)
        s1, s2 = forward(student), forward(student)
    assert torch.equal(t1, t2)  # deterministic in train mode
    assert not torch.equal(s1, s2)  # the student keeps its stochastic depth
    for (name, p), (name_t, q) in zip(student.state_dict().items(), teacher.state_dict().items(), strict=True):
        assert name == name_t and torch.equal(p, q), name
    drop = [m for m in student.modules() if type(m).__name__ == "DropPath"]
    assert drop and all(m.drop_prob > 0 for m in drop)
    assert all(m.drop_prob == 0 for m in teacher.modules() if type(m).__name__ == "DropPath")
    # the update keeps working (the same parameter names) and the teacher stays deterministic
    ema.update(student, momentum=0.5)
    with torch.no_grad():
        assert torch.equal(forward(teacher), forward(teacher))


def test_disable_stochastic_depth_counts_and_leaves_dropout():
    from cmd.teacher import disable_stochastic_depth

    model = nn.Sequential(_tiny_swin(0.2), nn.Dropout(0.3))
    assert disable_stochastic_depth(model) > 0
    assert disable_stochastic_depth(model) == 0  # idempotent
    assert model[1].p == 0.3
