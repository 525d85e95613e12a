"""DDP without find_unused_parameters, 2 gloo processes, every preset x (plain, fused), gated-attention pooling.

The network is built as ``examples/pretrain.py`` builds it (only the head parts the loss consumes:
``loss.student_outputs``) and called with ``outputs=loss.student_outputs`` / ``loss.teacher_outputs``;
the fused path's prototypes come out of the module's forward in ``CrossLevelOutput.prototypes``.
Two optimiser steps (DDP reports parameters without gradient at the second) must complete, and the
loss, every parameter gradient and both centers must equal one process on the combined batch.
The "dino" preset has no region term, hence no fused variant.
"""

from __future__ import annotations

import copy
from itertools import groupby

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmd.backbones.output import BackboneOutput
from cmd.heads import CrossLevelHead
from cmd.losses import CMDLoss
from cmd.network import CMDNetwork
from tests.dist_utils import run_distributed

WORLD, B_LOCAL, K, DIM = 2, 2, 16, 12
CONFIGS = [("dino", None), ("esvit", None), ("esvit", 2), ("cmd", None), ("cmd", 2)]


class TinyBackbone(nn.Module):
    """4 x 4 patches through one linear layer (D = 12); pooled = mean of the tokens."""

    embed_dim = DIM

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16, DIM)

    def forward_multicrop(self, crops):
        outs = []
        for (h, w), group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            t = self.proj(F.unfold(torch.cat(list(group)), 4, stride=4).transpose(1, 2))
            outs.append(BackboneOutput(t.mean(1), t, (h // 4, w // 4)))
        return outs


def _loss(preset, chunk):
    return CMDLoss.from_preset(preset, out_dim=K, n_local_crops=2, fused_chunk_size=chunk)


def _network(loss):
    """As examples/pretrain.py's build_network: gated attention only when the loss consumes MIL weights."""
    torch.manual_seed(0)
    outputs = loss.student_outputs
    head = CrossLevelHead(
        DIM, out_dim=K, hidden_dim=16, bottleneck_dim=8,
        pooling="gated_attention" if "mil_weights" in outputs else None,
        region_head=bool({"region", "region_embedding"} & outputs), pooling_hidden_dim=8,
    )  # fmt: skip
    return CMDNetwork(TinyBackbone(), head)


def _crops(step, batch):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(batch, 3, 12, 12, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 8, 8, generator=g) for _ in range(2)
    ]


def _train(student_fwd, student, loss, crops_per_step, shard):
    teacher = copy.deepcopy(student)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    results = []
    for step, crops in enumerate(crops_per_step):
        crops = [shard(c) for c in crops]
        with torch.no_grad():
            t_out = teacher(crops[:2], outputs=loss.teacher_outputs)
        out = loss(student_fwd(crops, outputs=loss.student_outputs), t_out, epoch=step)
        opt.zero_grad()
        out.loss.backward()
        missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"parameters without gradient: {missing}"
        results.append(dict(
            loss=out.loss.detach(), grads={n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad},
            center=loss.center.value.clone(), region_center=loss.region_center.value.clone(),
        ))  # fmt: skip
        opt.step()
    return results


def _ddp_runs(rank, world):
    steps = [_crops(s, B_LOCAL * world) for s in range(2)]
    shard = lambda c: c[rank * B_LOCAL : (rank + 1) * B_LOCAL]  # noqa: E731
    out = {}
    for preset, chunk in CONFIGS:
        loss = _loss(preset, chunk)
        student = _network(loss)
        ddp = nn.parallel.DistributedDataParallel(student)  # no find_unused_parameters
        out[(preset, chunk)] = _train(ddp, student, loss, steps, shard)
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_presets_plain_and_fused_equal_one_process_on_the_combined_batch():
    per_rank = run_distributed(_ddp_runs, WORLD)
    steps = [_crops(s, B_LOCAL * WORLD) for s in range(2)]
    for preset, chunk in CONFIGS:
        loss = _loss(preset, chunk)
        student = _network(loss)
        single = _train(student, student, loss, steps, lambda c: c)
        for step, ref in enumerate(single):
            ranks = [r[(preset, chunk)][step] for r in per_rank]
            msg = f"{preset} fused_chunk_size={chunk} step {step}"
            torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, ref["loss"], rtol=1e-5, atol=1e-6, msg=msg)
            for r in ranks:
                for name in ("center", "region_center"):
                    torch.testing.assert_close(r[name], ref[name], rtol=1e-5, atol=1e-6, msg=f"{msg} {name}")
                assert set(r["grads"]) == set(ref["grads"])
                for name, grad in ref["grads"].items():  # DDP averages: each rank holds the global gradient
                    torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{msg} {name}")
