"""The supervised reference: the same backbone trained with labels, to put a self-supervised gain in scale.

A self-supervised run says "k-NN went from 47.8 % to 75.4 %". Whether that is much depends on what
the backbone could reach on this data in this budget at all: [`train_supervised`][cmd.eval.train_supervised]
trains a backbone and a linear classifier end to end with cross-entropy, for a given number of steps,
so that the same k-NN protocol can be run on its features. The fraction of the gap between random
initialisation and this reference that self-supervision closes is
[`gap_closed`][cmd.eval.gap_closed].

Example:
    >>> import torch, cmd
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> backbone = cmd.create_backbone("resnet18", pretrained=False, num_channels=16)  # doctest: +SKIP
    >>> data = TensorDataset(torch.randn(32, 3, 32, 32), torch.arange(32) % 4)
    >>> result = train_supervised(backbone, DataLoader(data, batch_size=8), num_classes=4,
    ...                           steps=8, lr=1e-3, progress=False)  # doctest: +SKIP
    >>> result.steps  # doctest: +SKIP
    8
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..schedules import cosine_schedule
from .features import _as_features, _as_labels, _default_device, _split_batch
from .linear import LinearProbe

__all__ = ["SupervisedResult", "train_supervised", "gap_closed"]


@dataclass(frozen=True)
class SupervisedResult:
    """What [`train_supervised`][cmd.eval.train_supervised] did.

    Attributes:
        steps: optimisation steps taken.
        final_loss: cross-entropy of the last step.
        train_top1: top-1 (%) on the training batches of the last pass over the loader (at most
            one epoch's worth of the last steps), measured during training.
        time_s: wall-clock seconds of the training.
    """

    steps: int
    final_loss: float
    train_top1: float
    time_s: float


def train_supervised(
    backbone: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    steps: int,
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.04,
    warmup_steps: int = 0,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SupervisedResult:
    """Train ``backbone`` (in place) and a linear classifier on its image vector with labels.

    AdamW on the backbone and the classifier, a linear lr warm-up over ``warmup_steps`` then a half
    cosine from ``lr`` to ``min_lr``; the loader is cycled until ``steps`` steps are taken. The
    backbone is left in eval mode; the classifier is discarded (evaluate the backbone's features,
    e.g. with [`KNNClassifier`][cmd.eval.KNNClassifier], the same way as the self-supervised one).

    Args:
        backbone: images ``[B, 3, H, W]`` -> a ``BackboneOutput`` (its ``pooled [B, D]`` is used) or
            features ``[B, D]``.
        loader: yields ``(images [B, 3, H, W], labels [B])`` (further items are ignored).
        num_classes: C; every label must be in ``[0, C)``.
        steps: optimisation steps (>= 1).
        lr: peak learning rate (> 0).
        min_lr: the value the cosine tends to (>= 0).
        weight_decay: AdamW weight decay (>= 0).
        warmup_steps: linear warm-up steps, ``0 <= warmup_steps <= steps``.
        device: where to train (default: the backbone's device).
        seed: seed of the classifier's initial weights (a [`LinearProbe`][cmd.eval.LinearProbe]).
        progress: a tqdm bar over the steps.

    Returns:
        A [`SupervisedResult`][cmd.eval.SupervisedResult].

    Raises:
        ValueError: an option out of range, an empty loader (or a one-shot iterator exhausted
            before ``steps``), a label outside ``[0, C)`` or not an integer (0.9, NaN), or a
            backbone that returns something other than ``[B, D]``.
        TypeError: labels that are not numbers (strings).
        RuntimeError: the loss became non-finite; the message says whether the images, the
            features or the lr is the cause.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not (isinstance(warmup_steps, int) and 0 <= warmup_steps <= steps):
        raise ValueError(f"warmup_steps must be an int in [0, steps={steps}], got {warmup_steps!r}")
    for name, value, low_ok in (("lr", lr, False), ("min_lr", min_lr, True), ("weight_decay", weight_decay, True)):
        if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
            raise ValueError(f"{name} must be {'>= 0' if low_ok else '> 0'} and finite, got {value!r}")
    device = torch.device(device) if device is not None else _default_device(backbone)
    backbone.to(device)

    classifier: LinearProbe | None = None  # built on the first batch, when D is known
    optimizer: torch.optim.Optimizer | None = None
    # per-step lr: warm-up then cosine (the schedule helper works in epochs; here one "epoch" is a step)
    lr_schedule = cosine_schedule(lr, min_lr, epochs=steps, iters_per_epoch=1, warmup_epochs=warmup_steps)
    step, loss_value, start = 0, float("nan"), time.perf_counter()
    correct, seen = 0, 0
    bar = tqdm(total=steps, desc="supervised reference", disable=not progress, leave=False)
    backbone.train()
    while step < steps:
        batches_this_pass, correct, seen = 0, 0, 0
        for batch in loader:
            images, labels = _split_batch(batch)
            labels = _as_labels(labels).to(device)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(f"labels must have shape [B={images.shape[0]}], got {tuple(labels.shape)}")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
                raise ValueError(f"labels must be in [0, {num_classes}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            features = _as_features(backbone(images.to(device)), images.shape[0])
            if classifier is None:
                classifier = LinearProbe(features.shape[1], num_classes, seed=seed).to(device)
                params = [p for p in backbone.parameters() if p.requires_grad] + list(classifier.parameters())
                optimizer = torch.optim.AdamW(params, lr=float(lr_schedule[0]), weight_decay=weight_decay)
            assert optimizer is not None
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
            logits = classifier(features).float()
            loss = F.cross_entropy(logits, labels)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bar.close()
                raise RuntimeError(_non_finite_loss_message(step, lr, images, features))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += labels.numel()
            step += 1
            batches_this_pass += 1
            bar.update(1)
            if step >= steps:
                break
        if batches_this_pass == 0:
            bar.close()
            if step == 0:
                raise ValueError("the loader yielded no batch")
            raise ValueError(
                f"the loader was exhausted after {step} of steps={steps} steps: a one-shot iterator (e.g. a "
                f"generator) cannot be cycled; pass a DataLoader or another re-iterable, or steps <= {step}"
            )
    bar.close()
    backbone.eval()
    return SupervisedResult(steps=step, final_loss=loss_value, train_top1=100.0 * correct / max(seen, 1),
                            time_s=time.perf_counter() - start)


def _non_finite_loss_message(step: int, lr: float, images: torch.Tensor, features: torch.Tensor) -> str:
    where = f"the supervised loss became non-finite at step {step}"
    if not bool(torch.isfinite(images).all()):
        return f"{where}: the batch's images hold NaN or inf values; check the data (the lr is not the cause)"
    if not bool(torch.isfinite(features).all()):
        if step == 0:
            return f"{where}: the backbone's features are non-finite on finite images, before any update; check the backbone"
        return f"{where}: the backbone's features became non-finite (lr {lr}): lower the lr"
    return f"{where} (lr {lr}): lower the lr"


def gap_closed(before: float, after: float, reference: float) -> float:
    """The fraction of the gap from ``before`` to ``reference`` that ``after`` closes.

    ``(after - before) / (reference - before)``: 0 when nothing is gained, 1 when the self-supervised
    features are as good as the supervised reference (more than 1 when better, negative when
    worse than before). NaN when the reference is not above ``before`` (no gap to close).

    Example:
        >>> round(gap_closed(40.0, 55.0, 70.0), 3)
        0.5
    """
    if not reference > before:
        return float("nan")
    return (after - before) / (reference - before)
