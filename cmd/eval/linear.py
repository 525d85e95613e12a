"""Linear probing: a linear classifier trained on frozen backbone features (the DINO / EsViT protocol)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .. import distributed as dist
from .features import _as_features, _default_device, _split_batch, extract_features
from .label_fraction import check_label_fraction, class_balanced_subset

__all__ = ["LinearProbe", "train_linear_probe", "probe_accuracy"]


class LinearProbe(nn.Module):
    """A linear classifier on frozen features: ``logits = W x + b``.

    The weights start from N(0, 0.01^2) and the bias from 0; ``seed`` makes the start reproducible
    (and identical on every process).

    Args:
        in_features: D, the feature dimension (e.g. 4 x 384 = 1536 for ViT-S/16 with 4 blocks,
            2304 for Swin-T).
        num_classes: C.
        seed: seed of the initial weights (None: torch's global generator).

    Example:
        >>> probe = LinearProbe(1536, 200, seed=0)
        >>> probe(torch.zeros(8, 1536)).shape
        torch.Size([8, 200])
    """

    def __init__(self, in_features: int, num_classes: int, *, seed: int | None = None) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.linear = nn.Linear(in_features, num_classes)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01, generator=generator)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] features -> [B, C] logits."""
        if features.ndim != 2 or features.shape[1] != self.linear.in_features:
            raise ValueError(f"features must have shape [B, {self.linear.in_features}], got {tuple(features.shape)}")
        return self.linear(features)


def probe_accuracy(
    probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """Top-1 and top-5 (over min(5, C) classes) accuracy in % of ``probe`` on features [N, D]."""
    device = next(probe.parameters()).device
    correct1 = correct5 = 0.0
    with torch.no_grad():
        for start in range(0, features.shape[0], batch_size):
            logits = probe(features[start : start + batch_size].to(device).float())
            y = labels[start : start + batch_size].to(device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
            correct1 += float(top[:, 0].sum())
            correct5 += float(top.any(dim=1).sum())
    n = max(1, features.shape[0])
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n}


def _dataset_targets(dataset: Any) -> list[int] | None:
    for name in ("targets", "labels", "_labels"):
        targets = getattr(dataset, name, None)
        if targets is not None:
            return [int(t) for t in targets]
    return None


def _infer_num_classes(dataset: Any, *label_sets: torch.Tensor) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    targets = _dataset_targets(dataset)
    if targets is not None:
        return max(targets) + 1
    if label_sets:
        return max(int(y.max()) for y in label_sets if y.numel()) + 1
    raise ValueError(
        "cannot infer num_classes: the training dataset has no `classes` or `targets`; pass num_classes=..."
    )


def _subset_loader(loader: DataLoader, indices: torch.Tensor, seed: int) -> DataLoader:
    subset = Subset(loader.dataset, indices.tolist())
    sampler = DistributedSampler(subset, shuffle=True, seed=seed) if dist.is_dist() else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        subset,
        batch_size=loader.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        worker_init_fn=loader.worker_init_fn,
        generator=generator,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def train_linear_probe(
    backbone: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    *,
    num_classes: int | None = None,
    n_last_blocks: int = 4,
    avgpool: bool = False,
    epochs: int = 100,
    lr: float | None = None,
    lrs: Sequence[float] | None = None,
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    cache_features: bool = False,
    label_fraction: float | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train linear classifiers on frozen ``backbone.forward_last_blocks`` features; report accuracy.

    The backbone stays in eval mode under ``torch.no_grad`` throughout (BatchNorm statistics never
    drift; its mode is restored at the end). Features are
    ``backbone.forward_last_blocks(images, n=n_last_blocks, avgpool=avgpool)`` [B, D] (ViT: CLS of
    the last blocks; Swin: pooled last blocks). One [`LinearProbe`][cmd.eval.LinearProbe] per learning rate is trained
    in the same pass (same batches) with SGD (momentum 0.9, no weight decay by default), the rate
    following a cosine over the epochs (stepped per epoch), cross-entropy loss; each is evaluated on
    the validation set at the end.

    Transforms are the loaders' business: the protocol trains on random-resized-crop 224 + flip and
    evaluates on resize 256 + centre crop 224 (``cmd.eval_transform``).

    With ``cache_features=True`` the training features are extracted once and the heads train on
    them (much faster for small fine-grained sets); give that ``train_loader`` the *test* transform,
    as one random augmentation would otherwise be frozen in. Under ``torch.distributed`` the cached
    features are gathered on every process and the heads train identically everywhere; without
    caching each process trains on its sampler's shard and the head gradients are averaged over
    processes. Validation features are gathered in dataset order without duplicates either way.

    Args:
        backbone: a module with ``forward_last_blocks(x, n=..., avgpool=...) -> [B, D]``.
        train_loader: yields ``(images, labels, ...)``; shuffled (``DistributedSampler`` when
            distributed).
        val_loader: yields ``(images, labels, ...)``.
        num_classes: C; inferred from the training dataset's ``classes`` / ``targets`` when None.
        n_last_blocks: blocks whose outputs are concatenated (4 in the protocol).
        avgpool: also concatenate the average-pooled patch tokens (ViT).
        epochs: training epochs (100 in the protocol).
        lr: one learning rate; default ``1e-3 * batch / 256`` with the total batch size.
        lrs: several learning rates, one head each (exclusive with ``lr``).
        batch_size: mini-batch of the cached features (default: the loader's); without caching the
            loader's batch is used and this only sets the default ``lr``.
        momentum, weight_decay: SGD settings.
        cache_features: train on features extracted once.
        label_fraction: keep a seeded, class-balanced fraction of the training samples.
        seed: seed of the heads' initial weights, the label subset and the cached-feature shuffling.
        device: where to run; defaults to the backbone's device.
        amp: float16 autocast of the backbone on CUDA.
        progress: tqdm progress bars (rank 0 only).

    Returns:
        {"top1": %, "top5": %, "lr": the best rate (by top-1), "per_lr": {lr: {"top1", "top5"}},
        "probe": the best LinearProbe, "feature_dim": D, "num_train": training samples used}.

    Example:
        >>> result = train_linear_probe(backbone, train_loader, val_loader, epochs=100)  # doctest: +SKIP
        >>> result["top1"]  # doctest: +SKIP
    """
    if not callable(getattr(backbone, "forward_last_blocks", None)):
        raise TypeError(f"backbone must provide forward_last_blocks(x, n, avgpool), got {type(backbone).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if lr is not None and lrs is not None:
        raise ValueError("pass either lr or lrs, not both")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    loader_batch = train_loader.batch_size or 1
    batch_size = batch_size or loader_batch
    total_batch = batch_size if cache_features else loader_batch * dist.world_size()
    if lrs is not None:
        rates = [float(r) for r in lrs]
    else:
        rates = [float(lr) if lr is not None else 1e-3 * total_batch / 256]
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"learning rates must be positive and finite, got {rates!r}")

    if label_fraction is not None:
        check_label_fraction(label_fraction)
    device = _default_device(backbone) if device is None else torch.device(device)
    show = progress and dist.is_main_process()

    def features_of(model: Any, images: torch.Tensor) -> torch.Tensor:
        return model.forward_last_blocks(images, n=n_last_blocks, avgpool=avgpool)

    was_training = backbone.training
    backbone.eval()
    try:
        if cache_features:
            train_x, train_y = extract_features(
                backbone, train_loader, device=device, amp=amp, normalize=False, progress=show, forward=features_of
            )
            if label_fraction is not None:
                keep = class_balanced_subset(train_y, label_fraction, seed)
                train_x, train_y = train_x[keep], train_y[keep]
            n_cls = num_classes or _infer_num_classes(train_loader.dataset, train_y)
            heads = _make_heads(train_x.shape[1], n_cls, len(rates), seed, device)
            _check_label_range(train_y, n_cls, "training")
            _train_cached(heads, rates, train_x.to(device), train_y.to(device), epochs, batch_size, momentum,
                          weight_decay, seed, show)
            num_train = train_x.shape[0]
        else:
            loader = train_loader
            if label_fraction is not None:
                targets = _dataset_targets(train_loader.dataset)
                if targets is None:
                    raise ValueError(
                        "label_fraction without cache_features needs a dataset with `targets`; "
                        "use cache_features=True or a dataset exposing targets"
                    )
                loader = _subset_loader(train_loader, class_balanced_subset(targets, label_fraction, seed), seed)
            n_cls = num_classes or _infer_num_classes(train_loader.dataset)
            known = _dataset_targets(train_loader.dataset)
            if known is not None:  # fail before any training when the dataset's labels are known
                _check_label_range(torch.tensor(known, dtype=torch.long), n_cls, "training")
            heads, num_train = _train_streaming(backbone, features_of, loader, rates, n_cls, epochs, momentum,
                                                weight_decay, seed, device, amp, show)
        val_x, val_y = extract_features(
            backbone, val_loader, device=device, amp=amp, normalize=False, progress=show, forward=features_of
        )
    finally:
        if was_training:
            backbone.train()
    _check_label_range(val_y, n_cls, "validation")
    per_lr = {rate: probe_accuracy(head, val_x, val_y) for rate, head in zip(rates, heads)}
    best = max(range(len(rates)), key=lambda i: per_lr[rates[i]]["top1"])
    return {
        "top1": per_lr[rates[best]]["top1"],
        "top5": per_lr[rates[best]]["top5"],
        "lr": rates[best],
        "per_lr": per_lr,
        "probe": heads[best],
        "feature_dim": heads[best].linear.in_features,
        "num_train": num_train,
    }


def _check_label_range(labels: torch.Tensor, num_classes: int, which: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{which} labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def _make_heads(dim: int, num_classes: int, n: int, seed: int, device: torch.device) -> list[LinearProbe]:
    return [LinearProbe(dim, num_classes, seed=seed).to(device) for _ in range(n)]


def _optimizer(heads: list[LinearProbe], rates: list[float], momentum: float, weight_decay: float, epochs: int):
    optimizer = torch.optim.SGD(
        [{"params": head.parameters(), "lr": rate} for head, rate in zip(heads, rates)],
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    return optimizer, scheduler


def _step(heads, optimizer, features: torch.Tensor, labels: torch.Tensor, sync: bool) -> None:
    loss = sum(F.cross_entropy(head(features), labels) for head in heads)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync:  # average the head gradients over processes (each holds its own shard)
        for head in heads:
            for p in head.parameters():
                dist.all_reduce_sum(p.grad).div_(dist.world_size())
    optimizer.step()


def _train_cached(heads, rates, x, y, epochs, batch_size, momentum, weight_decay, seed, show) -> None:
    optimizer, scheduler = _optimizer(heads, rates, momentum, weight_decay, epochs)
    generator = torch.Generator().manual_seed(seed)
    for head in heads:
        head.train()
    for _ in tqdm(range(epochs), desc="linear probe (cached)", disable=not show, leave=False):
        order = torch.randperm(x.shape[0], generator=generator).to(x.device)
        for start in range(0, x.shape[0], batch_size):
            rows = order[start : start + batch_size]
            _step(heads, optimizer, x[rows], y[rows], sync=False)
        scheduler.step()
    for head in heads:
        head.eval()


def _train_streaming(backbone, features_of, loader, rates, num_classes, epochs, momentum, weight_decay, seed,
                     device, amp, show):
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    sync = dist.is_dist() and dist.world_size() > 1
    heads = optimizer = scheduler = None
    for epoch in tqdm(range(epochs), desc="linear probe", disable=not show, leave=False):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for batch in loader:
            images, labels = _split_batch(batch)
            images = images.to(device, non_blocking=True)
            labels = torch.as_tensor(labels).reshape(-1).long()
            if labels.device.type == "cpu":  # free to check here; on an accelerator it would sync
                _check_label_range(labels, num_classes, "training")
            labels = labels.to(device)
            with torch.no_grad(), autocast:
                feats = _as_features(features_of(backbone, images), images.shape[0])
            feats = feats.float()
            if heads is None:  # the feature dimension is known from the first batch
                heads = _make_heads(feats.shape[1], num_classes, len(rates), seed, device)
                optimizer, scheduler = _optimizer(heads, rates, momentum, weight_decay, epochs)
            _step(heads, optimizer, feats, labels, sync)
        if heads is None:
            raise ValueError("the training loader yielded no batch")
        scheduler.step()
    for head in heads:
        head.eval()
    return heads, len(loader.dataset)
