"""Two gloo processes: loss centers, values, Sinkhorn targets and the batch entropy equal one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from cmd.heads.output import CrossLevelOutput
from cmd.losses import CMDLoss, DINOLoss
from tests.dist_utils import run_distributed

WORLD, B_LOCAL, K = 2, 2, 16
STUDENT_GROUPS, TEACHER_GROUPS = [(2, 3), (2, 2)], [(2, 3)]
WEIGHTS = dict(image_weight=0.5, region_weight=0.5, inter_weight=0.2, swapped_weight=0.3)


def _batch(seed: int, batch: int):
    g = torch.Generator().manual_seed(seed)

    def group(crops, n):
        rows = crops * batch
        return CrossLevelOutput(
            torch.randn(rows, K, generator=g),
            torch.randn(rows, n, K, generator=g),
            torch.randn(rows, n, 5, generator=g),
            torch.softmax(torch.randn(rows, n, generator=g), -1),
        )

    return [group(*c) for c in STUDENT_GROUPS], [group(*c) for c in TEACHER_GROUPS]


def _shard(t: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    """This rank's images of a crop-major tensor [C * B_global, ...] -> [C * B_local, ...]."""
    if t is None:
        return None
    b_global = B_LOCAL * world
    crops = t.shape[0] // b_global
    local = t.view(crops, b_global, *t.shape[1:])[:, rank * B_LOCAL : (rank + 1) * B_LOCAL]
    return local.reshape(crops * B_LOCAL, *t.shape[1:]).clone()


def _shard_outputs(outputs, rank, world, requires_grad=False):
    sharded = []
    for o in outputs:
        parts = [_shard(getattr(o, f), rank, world) for f in ("image", "region", "tokens", "mil_weights")]
        for p in parts:
            p.requires_grad_(requires_grad)
        sharded.append(CrossLevelOutput(*parts))
    return sharded


def _two_steps(rank, world, batches):
    cmd_loss = CMDLoss(K, n_global_crops=2, n_local_crops=2, **WEIGHTS)
    sink_loss = CMDLoss(K, n_global_crops=2, n_local_crops=2, centering="sinkhorn", **WEIGHTS)
    dino_loss = DINOLoss(K, n_local_crops=2)
    results = []
    for step, (student, teacher) in enumerate(batches):
        s = _shard_outputs(student, rank, world, requires_grad=True)
        t = _shard_outputs(teacher, rank, world)
        out = cmd_loss(s, t, epoch=step)
        out.loss.backward()
        dino = dino_loss(torch.cat([o.image for o in s]).detach(), t[0].image, epoch=step)
        s2 = _shard_outputs(student, rank, world, requires_grad=True)
        sink = sink_loss(s2, t, epoch=step)
        sink.loss.backward()
        results.append(
            dict(
                loss=out.loss.detach(),
                batch_entropy=out.terms["teacher_batch_entropy"],
                sink=sink.loss.detach(),
                sink_grads=[o.region.grad for o in s2],
                dino=dino,
                center=cmd_loss.center.value.clone(),
                region_center=cmd_loss.region_center.value.clone(),
                dino_center=dino_loss.center.value.clone(),
                grads=[(o.image.grad, o.region.grad, o.mil_weights.grad) for o in s],
            )
        )
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_centers_loss_and_gradients_equal_single_process_on_the_concatenated_batch():
    batches = [_batch(seed, B_LOCAL * WORLD) for seed in (0, 1)]
    per_rank = run_distributed(_two_steps, WORLD, batches)

    cmd_loss = CMDLoss(K, n_global_crops=2, n_local_crops=2, **WEIGHTS)
    sink_loss = CMDLoss(K, n_global_crops=2, n_local_crops=2, centering="sinkhorn", **WEIGHTS)
    dino_loss = DINOLoss(K, n_local_crops=2)
    for step, (student, teacher) in enumerate(batches):
        s = _shard_outputs(student, 0, 1, requires_grad=True)  # the whole batch in one process
        out = cmd_loss(s, teacher, epoch=step)
        out.loss.backward()
        s2 = _shard_outputs(student, 0, 1, requires_grad=True)
        sink = sink_loss(s2, teacher, epoch=step)
        sink.loss.backward()
        dino = dino_loss(torch.cat([o.image for o in s]).detach(), teacher[0].image, epoch=step)
        for rank, results in enumerate(per_rank):
            r = results[step]
            torch.testing.assert_close(r["center"], cmd_loss.center.value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["region_center"], cmd_loss.region_center.value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["dino_center"], dino_loss.center.value, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r["batch_entropy"], out.terms["teacher_batch_entropy"], rtol=1e-5, atol=1e-6)
            for gr, o in zip(r["sink_grads"], s2):  # Sinkhorn-Knopp's sums over samples span both processes
                torch.testing.assert_close(gr / WORLD, _shard(o.region.grad, rank, WORLD), rtol=1e-4, atol=1e-7)
            for (gi, gr, gw), o in zip(r["grads"], s):
                # DDP averages gradients over processes: each rank's gradient / world = the single-process one.
                torch.testing.assert_close(gi / WORLD, _shard(o.image.grad, rank, WORLD), rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(gr / WORLD, _shard(o.region.grad, rank, WORLD), rtol=1e-4, atol=1e-7)
                torch.testing.assert_close(gw / WORLD, _shard(o.mil_weights.grad, rank, WORLD), rtol=1e-4, atol=1e-6)
        # equal local batches: the mean of the per-process losses is the loss of the whole batch
        mean_loss = sum(results[step]["loss"] for results in per_rank) / WORLD
        torch.testing.assert_close(mean_loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
        mean_sink = sum(results[step]["sink"] for results in per_rank) / WORLD
        torch.testing.assert_close(mean_sink, sink.loss.detach(), rtol=1e-5, atol=1e-6)
        mean_dino = sum(results[step]["dino"] for results in per_rank) / WORLD
        torch.testing.assert_close(mean_dino, dino, rtol=1e-5, atol=1e-6)
