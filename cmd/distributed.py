"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Every collective in the library goes through this module, so single-process code paths stay plain
and a statistic that spans the batch (loss centers, evaluation features) is computed over the
*global* batch when ``torch.distributed`` is initialised (torchrun, DDP).

Example:
    >>> import torch
    >>> from cmd import distributed as dist
    >>> x = torch.ones(3)
    >>> dist.all_reduce_sum(x)  # the sum over processes; x itself alone
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

__all__ = [
    "is_dist",
    "world_size",
    "rank",
    "is_main_process",
    "barrier",
    "all_reduce_sum",
    "all_reduce_max",
    "all_gather_cat",
    "gather_in_dataset_order",
    "init_distributed_from_env",
]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without ``torch.distributed``)."""
    return tdist.get_world_size() if is_dist() else 1


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return tdist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def barrier() -> None:
    """Synchronise all processes (no-op alone)."""
    if is_dist():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes **in place** and return it (unchanged alone).

    Not differentiable: use it for statistics (centers, counts), never inside the loss graph.
    """
    if is_dist() and world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over all processes, **in place** (unchanged alone). Not differentiable."""
    if is_dist() and world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` [n_r, ...] from every process along dim 0, in rank order.

    Processes may hold different ``n_r`` (the tensors are padded for the collective and trimmed).
    Returns the tensor itself alone. Not differentiable.
    """
    if not is_dist() or world_size() == 1:
        return tensor
    n = world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    tdist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    max_n = max(counts)
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(n)]
    tdist.all_gather(out, padded.contiguous())
    return torch.cat([o[:c] for o, c in zip(out, counts)], dim=0)


def gather_in_dataset_order(values: torch.Tensor, indices: torch.Tensor, total: int) -> torch.Tensor:
    """Gather per-process rows into one tensor ordered by dataset index, without duplicates.

    ``DistributedSampler`` pads the last batch with repeated samples so every process sees the same
    number; the padding rows carry indices already seen and are dropped here.

    Args:
        values: [n_local, ...] rows computed by this process.
        indices: [n_local] long, the dataset index of each row.
        total: the dataset size N.

    Returns:
        [N, ...] rows in dataset order (on every process).

    Raises:
        ValueError: when some dataset index in ``range(total)`` was never computed.
    """
    if values.shape[0] != indices.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows but indices has {indices.shape[0]}")
    indices = indices.to(device=values.device, dtype=torch.long)
    all_values = all_gather_cat(values)
    all_indices = all_gather_cat(indices)
    out = values.new_zeros((total, *values.shape[1:]))
    seen = torch.zeros(total, dtype=torch.bool, device=values.device)
    if all_indices.numel() and (all_indices.min() < 0 or all_indices.max() >= total):
        raise ValueError(f"dataset indices must lie in [0, {total}), got [{all_indices.min()}, {all_indices.max()}]")
    # Keep the first occurrence of each index (padding repeats come later in rank order or are equal).
    order = torch.arange(all_indices.numel(), device=values.device)
    first = torch.full((total,), all_indices.numel(), dtype=torch.long, device=values.device)
    first.scatter_reduce_(0, all_indices, order, reduce="amin")
    keep = first[all_indices] == order
    out[all_indices[keep]] = all_values[keep]
    seen[all_indices[keep]] = True
    if not bool(seen.all()):
        missing = (~seen).nonzero().flatten()[:10].tolist()
        raise ValueError(f"{int((~seen).sum())} dataset indices were never computed, e.g. {missing}")
    return out


def init_distributed_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Returns True when a process group is (now) initialised, False in a plain single process
    (no ``WORLD_SIZE`` / ``RANK`` in the environment). The backend defaults to NCCL with CUDA and
    gloo otherwise.
    """
    if is_dist():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tdist.init_process_group(backend=backend)
    return True
