"""EMA teacher with a DistributedDataParallel student (gloo, 2 CPU processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmd.teacher import EMATeacher
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _ema_with_ddp(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.GELU(), nn.Linear(6, 3))
    student = nn.parallel.DistributedDataParallel(model)
    ema = EMATeacher(student, momentum=0.9)
    before = {n: p.clone() for n, p in ema.teacher.named_parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 + rank))  # different data per rank
    for _ in range(2):
        opt.zero_grad()
        student(x).pow(2).sum().backward()
        opt.step()
    momentum = ema.update(student)
    reference = {n: 0.9 * before[n] + 0.1 * p.detach() for n, p in model.named_parameters()}
    return {
        "momentum": momentum,
        "teacher_type": type(ema.teacher).__name__,
        "teacher": {n: p.detach().clone() for n, p in ema.teacher.named_parameters()},
        "teacher_buffers": {n: b.clone() for n, b in ema.teacher.named_buffers()},
        "student_buffers": {n: b.clone() for n, b in model.named_buffers()},
        "reference": reference,
        "moved": any(not torch.equal(before[n], p) for n, p in ema.teacher.named_parameters()),
    }


@pytest.mark.slow
def test_ema_update_with_ddp_student():
    results = run_distributed(_ema_with_ddp, 2)
    for r in results:
        assert r["momentum"] == 0.9 and r["teacher_type"] == "Sequential" and r["moved"]
        assert set(r["teacher"]) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
        for name, value in r["reference"].items():
            torch.testing.assert_close(r["teacher"][name], value, rtol=1e-6, atol=1e-6)
        for name, value in r["student_buffers"].items():  # BatchNorm statistics reach the teacher
            assert torch.equal(r["teacher_buffers"][name], value), name
    # DDP keeps students identical, hence the teachers too
    for name in results[0]["teacher"]:
        assert torch.equal(results[0]["teacher"][name], results[1]["teacher"][name])
