"""The training loops of the linear probe: several heads (one per learning rate) in one pass.

Private to [`train_linear_probe`][cmd.eval.train_linear_probe]: momentum SGD with a cosine over the
epochs (stepped per epoch, DINO's eval_linear.py), cross-entropy, on cached features or on a
loader whose images go through the frozen backbone. An ``on_epoch_end(epoch, heads)`` callback
lets the caller follow the heads (the official protocol's test accuracy after every epoch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import distributed as dist
from .features import _as_features, _as_labels, _split_batch
from .linear_head import LinearProbe

EpochHook = Callable[[int, list], None]


def make_heads(dim: int, num_classes: int, n: int, seed: int, device: torch.device) -> list[LinearProbe]:
    return [LinearProbe(dim, num_classes, seed=seed).to(device) for _ in range(n)]


def check_label_range(labels: torch.Tensor, num_classes: int, which: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{which} labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def _optimizer(heads: list, rates: list[float], momentum: float, weight_decay: float, epochs: int):
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": rate} for head, rate in zip(heads, rates)],
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    return optimizer, scheduler


def _step(heads: list, optimizer, features: torch.Tensor, labels: torch.Tensor, sync: bool) -> None:
    # one loss per head, summed: the gradient of each head is its own (a diverged head harms no other)
    loss = sum(F.cross_entropy(head(features), labels) for head in heads)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync:  # average the head gradients over processes (each holds its own shard)
        for head in heads:
            for p in head.parameters():
                dist.all_reduce_sum(p.grad).div_(dist.world_size())
    optimizer.step()


def train_cached(heads: list, rates: list[float], x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                 batch_size: int, momentum: float, weight_decay: float, seed: int, show: bool,
                 on_epoch_end: EpochHook | None = None) -> None:
    """Train ``heads`` on features ``x`` [N, D] and labels ``y`` [N] (same device), identically everywhere."""
    optimizer, scheduler = _optimizer(heads, rates, momentum, weight_decay, epochs)
    generator = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(epochs), desc="linear probe (cached)", disable=not show, leave=False):
        for head in heads:
            head.train()
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            rows = order[start : start + batch_size]
            _step(heads, optimizer, x[rows], y[rows], sync=False)
        _end_epoch(epoch, heads, scheduler, on_epoch_end)


def _end_epoch(epoch: int, heads: list, scheduler: Any, on_epoch_end: EpochHook | None) -> None:
    """Step the lr schedule, put the heads in eval mode, call the epoch hook (both training loops)."""
    scheduler.step()
    for head in heads:
        head.eval()
    if on_epoch_end is not None:
        on_epoch_end(epoch, heads)


def train_streaming(backbone: Any, features_of: Callable, loader: DataLoader, rates: list[float], *,
                    num_classes: int, epochs: int, momentum: float, weight_decay: float, seed: int,
                    device: torch.device, amp: bool, show: bool, on_epoch_end: EpochHook | None = None) -> list:
    """Train one head per rate on the frozen backbone's features of every batch of ``loader``.

    Under torch.distributed each process trains on its sampler's shard and the head gradients are
    averaged, so every process holds the same heads.
    """
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    sync = dist.is_dist() and dist.world_size() > 1
    heads: list = []
    optimizer = scheduler = None
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show, leave=False):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for head in heads:
            head.train()
        for batch in loader:
            images, labels = _split_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = _as_labels(labels).reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise ValueError(f"a training batch has {images.shape[0]} images but {labels.shape[0]} labels")
            if labels.device.type == "cpu":  # free to check here; on an accelerator it would sync
                check_label_range(labels, num_classes, "training")
            labels = labels.to(device)
            with torch.no_grad(), autocast:
                feats = _as_features(features_of(backbone, images), images.shape[0])
            feats = feats.float()
            if not heads:  # the feature dimension is known from the first batch
                heads = make_heads(feats.shape[1], num_classes, len(rates), seed, device)
                optimizer, scheduler = _optimizer(heads, rates, momentum, weight_decay, epochs)
            _step(heads, optimizer, feats, labels, sync)
        if not heads:
            raise ValueError("the training loader yielded no batch")
        _end_epoch(epoch, heads, scheduler, on_epoch_end)
    return heads
