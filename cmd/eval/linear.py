"""Linear probing: a linear classifier trained on frozen backbone features (the DINO / EsViT protocol).

The learning rate is picked on a validation split held out from the *training* split (seeded,
class-balanced), never on the test split; the head is then retrained on the whole training split
at that rate and its test accuracy reported. The official code's number, the best test accuracy
over the epochs (which picks the epoch on the test split), is reported beside it under its own
name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as dist
from ._probe_protocol import ProbeRun
from .features import _default_device
from .label_fraction import check_label_fraction
from .linear_head import LinearProbe, probe_accuracy

__all__ = ["LinearProbe", "train_linear_probe", "probe_accuracy", "default_lr_sweep", "DEFAULT_LR_MULTIPLIERS"]

#: The default sweep: the official rate ``1e-3 * total batch / 256`` times each of these. The
#: official rate is tuned for ImageNet-sized training sets (thousands of steps); on a few hundred
#: images it moves the head too little in 100 epochs, hence the rates above it.
DEFAULT_LR_MULTIPLIERS: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


def default_lr_sweep(total_batch: int) -> list[float]:
    """The default learning rates of the probe: ``1e-3 * total_batch / 256`` times `DEFAULT_LR_MULTIPLIERS`.

    The first is the official protocol's rate (DINO / EsViT eval_linear.py: ``--lr 0.001`` scaled
    by the total batch over 256).

    Example:
        >>> default_lr_sweep(256)[:3]
        [0.001, 0.003, 0.01]
    """
    if isinstance(total_batch, bool) or not isinstance(total_batch, int) or total_batch < 1:
        raise ValueError(f"total_batch must be a positive int, got {total_batch!r}")
    base = 1e-3 * total_batch / 256
    return [float(f"{base * m:.6g}") for m in DEFAULT_LR_MULTIPLIERS]


def train_linear_probe(
    backbone: nn.Module,
    train_loader: DataLoader,
    test_loader: DataLoader,
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
    val_fraction: float = 0.1,
    refit: bool = True,
    train_eval_loader: DataLoader | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a linear classifier on frozen ``backbone.forward_last_blocks`` features; its test accuracy.

    **Protocol.** Features are ``backbone.forward_last_blocks(images, n=n_last_blocks,
    avgpool=avgpool)`` [B, D] (ViT: CLS of the last blocks; Swin: pooled last blocks), the backbone
    in eval mode under ``torch.no_grad`` (BatchNorm statistics never drift; its mode is restored at
    the end). A [`LinearProbe`][cmd.eval.LinearProbe] is trained with SGD (momentum 0.9, no weight
    decay by default), cross-entropy, the rate following a cosine to 0 over the epochs (stepped per
    epoch).

    - **Several rates** (``lrs``, or the default sweep `default_lr_sweep` when neither ``lr`` nor
      ``lrs`` is given): a seeded, class-balanced ``val_fraction`` of the training samples is held
      out (`class_balanced_split`); one head per rate trains on the rest, all in the same pass (the
      same batches), and the rate whose head has the best top-1 on the held-out samples is picked.
      With ``refit`` (default) a fresh head then trains on the whole training split at that rate
      (so the reported head has seen every training label, as the k-NN has); without, the picked
      head is reported. The test split never takes part in the choice.
    - **One rate** (``lr``): one head trains on the whole training split; nothing is held out. The
      official protocol is ``lr=1e-3 * total_batch / 256, epochs=100`` with augmented training
      images (``cache_features=False``).

    The reported ``top1`` / ``top5`` are the test accuracy of the reported head after the last
    epoch. The official code (eval_linear.py) reports instead the best test top-1 over the epochs,
    which picks the epoch on the test split: it is returned as ``best_test_top1_over_epochs``, for
    comparison with published numbers only.

    Transforms are the loaders' business: the protocol trains on random-resized-crop 224 + flip and
    evaluates on resize 256 + centre crop 224 (``cmd.eval_transform``). The held-out validation
    images are read through ``train_eval_loader`` (the training set with the test transform, same
    dataset order) when given; with ``cache_features`` through ``train_loader`` itself (which then
    has the test transform); otherwise through ``train_loader``'s own (random) transform, a noisier
    but still test-free choice.

    With ``cache_features=True`` the training features are extracted once and the heads train on
    them (much faster for small fine-grained sets); give that ``train_loader`` the *test* transform,
    as one random augmentation would otherwise be frozen in. Under ``torch.distributed`` the cached
    features are gathered on every process and the heads train identically everywhere; without
    caching each process trains on its sampler's shard and the head gradients are averaged over
    processes. Test and validation features are gathered in dataset order without duplicates.

    Args:
        backbone: a module with ``forward_last_blocks(x, n=..., avgpool=...) -> [B, D]``.
        train_loader: yields ``(images, labels, ...)``; shuffled (``DistributedSampler`` when
            distributed). Picking among several rates without caching needs its dataset's
            ``targets`` (or ``labels``) to draw the validation split.
        test_loader: yields ``(images, labels, ...)``; only ever used to report.
        num_classes: C; inferred from the training dataset's ``classes`` / ``targets`` when None.
        n_last_blocks: blocks whose outputs are concatenated (4 in the protocol); at most the
            backbone's ``num_blocks``.
        avgpool: also concatenate the average-pooled patch tokens (ViT).
        epochs: training epochs (100 in the protocol).
        lr: one learning rate: no validation split (exclusive with ``lrs``).
        lrs: the rates to pick from on the validation split; default `default_lr_sweep` of the
            total batch size.
        batch_size: mini-batch of the cached features (default: the loader's); without caching the
            loader's batch is used and this only sets the default rates.
        momentum, weight_decay: SGD settings.
        cache_features: train on features extracted once.
        label_fraction: keep a seeded, class-balanced fraction of the training samples (before the
            validation split is drawn from them).
        val_fraction: in (0, 1), the share of every class held out to pick the rate (0.1).
        refit: retrain on the whole training split at the picked rate (True) or report the head
            trained without the held-out samples (False).
        train_eval_loader: the training set with the test transform, for the validation features
            without caching (see above).
        seed: seed of the heads' initial weights, the label subset, the validation split and the
            cached-feature shuffling.
        device: where to run; defaults to the backbone's device.
        amp: float16 autocast of the backbone on CUDA.
        progress: tqdm progress bars (rank 0 only).

    Returns:
        {"top1": %, "top5": % (test, the reported head after the last epoch), "lr": its rate,
        "lr_selection": "validation" (picked on the held-out split) or "single" (one rate given),
        "per_lr": {lr: {"val_top1", "val_top5"}} (only with several rates; NaN for a head that
        diverged), "refit": whether the reported head was retrained on the whole training split,
        "best_test_top1_over_epochs": the official protocol's number (peeks at the test split),
        "probe": the reported LinearProbe, "feature_dim": D, "num_train": samples the reported head
        trained on, "num_val": samples held out (0 with one rate)}.

    Raises:
        ValueError: bad options, labels outside ``[0, C)`` or not integers, ``n_last_blocks`` above
            the backbone's depth, or too few samples to hold out a validation split.
        RuntimeError: every head diverged (non-finite weights).

    Example:
        >>> result = train_linear_probe(backbone, train_loader, test_loader, epochs=100)  # doctest: +SKIP
        >>> result["top1"], result["lr"], result["per_lr"]  # doctest: +SKIP
    """
    if not callable(getattr(backbone, "forward_last_blocks", None)):
        raise TypeError(f"backbone must provide forward_last_blocks(x, n, avgpool), got {type(backbone).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if lr is not None and lrs is not None:
        raise ValueError("pass either lr or lrs, not both")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    depth = getattr(backbone, "num_blocks", None)
    if isinstance(n_last_blocks, bool) or not isinstance(n_last_blocks, int) or n_last_blocks < 1 or (
        isinstance(depth, int) and n_last_blocks > depth
    ):
        limit = f" (the backbone has {depth} blocks)" if isinstance(depth, int) else ""
        raise ValueError(f"n_last_blocks must be an int in [1, {depth if isinstance(depth, int) else 'depth'}]"
                         f"{limit}, got {n_last_blocks!r}")
    loader_batch = train_loader.batch_size or 1
    batch_size = batch_size or loader_batch
    total_batch = batch_size if cache_features else loader_batch * dist.world_size()
    if lrs is not None:
        rates = [float(r) for r in lrs]
    elif lr is not None:
        rates = [float(lr)]
    else:
        rates = default_lr_sweep(total_batch)
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"learning rates must be positive and finite, got {rates!r}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"learning rates must be distinct, got {rates!r}")
    if label_fraction is not None:
        check_label_fraction(label_fraction)
    device = _default_device(backbone) if device is None else torch.device(device)
    run = ProbeRun(backbone, n_last_blocks, avgpool, epochs, batch_size, momentum, weight_decay, seed, device,
                    amp, progress and dist.is_main_process())
    was_training = backbone.training
    backbone.eval()
    try:
        return run.protocol(train_loader, test_loader, train_eval_loader, rates, num_classes, cache_features,
                            label_fraction, val_fraction, refit)
    finally:
        if was_training:
            backbone.train()
