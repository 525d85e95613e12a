"""The linear probe's protocol: hold out a validation split, pick the rate on it, refit, report on test.

Private to [`train_linear_probe`][cmd.eval.train_linear_probe], which checks the arguments and
documents the protocol; the training loops are in ``_probe_training``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .. import distributed as dist
from ._probe_training import check_label_range, make_heads, train_cached, train_streaming
from .features import _as_labels, extract_features
from .label_fraction import class_balanced_split, class_balanced_subset
from .linear_head import probe_accuracy


def _dataset_targets(dataset: Any) -> list[int] | None:
    for name in ("targets", "labels", "_labels"):
        targets = getattr(dataset, name, None)
        if targets is not None:
            return _as_labels(list(targets)).reshape(-1).tolist()
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


def _subset_loader(loader: DataLoader, indices: torch.Tensor, seed: int, *, shuffle: bool = True) -> DataLoader:
    """``loader`` over ``loader.dataset[indices]`` (shuffled for training; in order for features)."""
    subset = Subset(loader.dataset, indices.tolist())
    sampler = DistributedSampler(subset, shuffle=shuffle, seed=seed) if dist.is_dist() else None
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        subset,
        batch_size=loader.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last and shuffle,
        worker_init_fn=loader.worker_init_fn,
        generator=generator,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


class ProbeRun:
    """One call of `train_linear_probe`: the settings every training pass shares, and the protocol."""

    def __init__(self, backbone, n_last_blocks, avgpool, epochs, batch_size, momentum, weight_decay, seed, device,
                 amp, show) -> None:
        self.backbone, self.n, self.avgpool, self.epochs = backbone, n_last_blocks, avgpool, epochs
        self.batch_size, self.momentum, self.weight_decay = batch_size, momentum, weight_decay
        self.seed, self.device, self.amp, self.show = seed, device, amp, show

    def features_of(self, model: Any, images: torch.Tensor) -> torch.Tensor:
        return model.forward_last_blocks(images, n=self.n, avgpool=self.avgpool)

    def extract(self, loader: DataLoader, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return extract_features(self.backbone, loader, device=self.device, amp=self.amp, normalize=False,
                                progress=self.show, forward=self.features_of, desc=desc)

    def protocol(self, train_loader, test_loader, train_eval_loader, rates, num_classes, cache_features,
                 label_fraction, val_fraction, refit) -> dict[str, Any]:
        test_x, test_y = self.extract(test_loader, "features of the test split")
        select = len(rates) > 1
        if cache_features:
            train_x, train_y = self.extract(train_loader, "features of the training split")
            if label_fraction is not None:
                keep = class_balanced_subset(train_y, label_fraction, self.seed)
                train_x, train_y = train_x[keep], train_y[keep]
            n_cls = num_classes or _infer_num_classes(train_loader.dataset, train_y)
            check_label_range(train_y, n_cls, "training")
            labels, data = train_y, (train_x.to(self.device), train_y.to(self.device))
        else:
            targets = _dataset_targets(train_loader.dataset)
            labelled = torch.arange(len(train_loader.dataset))
            if label_fraction is not None or select:
                if targets is None:
                    need = "label_fraction" if label_fraction is not None else "picking among several learning rates"
                    raise ValueError(
                        f"{need} without cache_features needs the training dataset's `targets` (to draw a "
                        "class-balanced subset); use cache_features=True, a dataset exposing targets, or one lr"
                    )
            if label_fraction is not None:
                labelled = class_balanced_subset(targets, label_fraction, self.seed)
            n_cls = num_classes or _infer_num_classes(train_loader.dataset)
            labels = None
            if targets is not None:  # fail before any training when the dataset's labels are known
                labels = torch.tensor(targets, dtype=torch.long)[labelled]
                check_label_range(labels, n_cls, "training")
            data = (train_loader, train_eval_loader, labelled)
        check_label_range(test_y, n_cls, "test")

        out: dict[str, Any] = {"lr_selection": "validation" if select else "single", "num_val": 0}
        if select:
            assert labels is not None
            fit_rows, val_rows = class_balanced_split(labels, val_fraction, self.seed)
            if fit_rows.numel() == 0 or val_rows.numel() == 0:
                raise ValueError(
                    f"cannot hold out a validation split from {labels.numel()} training samples (every class "
                    "needs at least 2): pass one lr (no selection) or more training data"
                )
            test_tracker = None if refit else _TestTracker(test_x, test_y)  # the official number of the pick
            heads, val = self._select(data, cache_features, fit_rows, val_rows, rates, n_cls, test_tracker)
            out["per_lr"] = val
            out["num_val"] = int(val_rows.numel())
            finite = [i for i, r in enumerate(rates) if math.isfinite(val[r]["val_top1"])]
            if not finite:
                raise RuntimeError(f"every head diverged (non-finite weights) at the learning rates {rates}: "
                                   "pass smaller --lrs")
            best = max(finite, key=lambda i: val[rates[i]]["val_top1"])  # ties: the first (smaller in the sweep)
            rate = rates[best]
        else:
            rate = rates[0]
        if select and not refit:
            head, history = heads[best], test_tracker.top1[best]
            num_train = int(fit_rows.numel())
        else:
            tracker = _TestTracker(test_x, test_y)
            (head,) = self._train(data, cache_features, None, [rate], n_cls, tracker)
            history = tracker.top1[0]
            num_train = labels.numel() if labels is not None else len(data[2])
        test = probe_accuracy(head, test_x, test_y)
        out.update(
            top1=test["top1"], top5=test["top5"], lr=rate, refit=bool(select and refit),
            best_test_top1_over_epochs=max(history) if history else float("nan"),
            probe=head, feature_dim=head.linear.in_features, num_train=int(num_train),
        )
        order = ["top1", "top5", "lr", "lr_selection", "per_lr", "refit", "best_test_top1_over_epochs", "probe",
                 "feature_dim", "num_train", "num_val"]
        return {k: out[k] for k in order if k in out}

    def _select(self, data, cached, fit_rows, val_rows, rates, n_cls, tracker):
        """Heads trained without the held-out rows, and their accuracy on them (NaN when diverged)."""
        if cached:
            train_x, train_y = data
            val_x, val_y = train_x[val_rows.to(train_x.device)], train_y[val_rows.to(train_y.device)]
        else:
            train_loader, eval_loader, labelled = data
            source = eval_loader if eval_loader is not None else train_loader
            if eval_loader is not None and len(eval_loader.dataset) != len(train_loader.dataset):
                raise ValueError(f"train_eval_loader has {len(eval_loader.dataset)} samples but the training set "
                                 f"{len(train_loader.dataset)}: it must be the same dataset with the test transform")
            val_x, val_y = self.extract(_subset_loader(source, labelled[val_rows], self.seed, shuffle=False),
                                        "features of the validation split")
        heads = self._train(data, cached, fit_rows, rates, n_cls, tracker)
        val = {}
        for rate, head in zip(rates, heads):
            if all(bool(torch.isfinite(p).all()) for p in head.parameters()):
                m = probe_accuracy(head, val_x, val_y)
                val[rate] = {"val_top1": m["top1"], "val_top5": m["top5"]}
            else:
                val[rate] = {"val_top1": float("nan"), "val_top5": float("nan")}
        return heads, val

    def _train(self, data, cached, rows, rates, n_cls, tracker) -> list:
        hook = tracker.record if tracker is not None else None
        if cached:
            x, y = data
            if rows is not None:
                x, y = x[rows.to(x.device)], y[rows.to(y.device)]
            heads = make_heads(x.shape[1], n_cls, len(rates), self.seed, self.device)
            train_cached(heads, rates, x, y, epochs=self.epochs, batch_size=self.batch_size, momentum=self.momentum,
                         weight_decay=self.weight_decay, seed=self.seed, show=self.show, on_epoch_end=hook)
            return heads
        train_loader, _, labelled = data
        indices = labelled if rows is None else labelled[rows]
        loader = train_loader if indices.numel() == len(train_loader.dataset) else _subset_loader(
            train_loader, indices, self.seed)
        return train_streaming(self.backbone, self.features_of, loader, rates, num_classes=n_cls, epochs=self.epochs,
                               momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed,
                               device=self.device, amp=self.amp, show=self.show, on_epoch_end=hook)


class _TestTracker:
    """The test top-1 of every head after every epoch (the official protocol's 'best over the epochs')."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.top1: list[list[float]] = []

    def record(self, epoch: int, heads: list) -> None:
        if not self.top1:
            self.top1 = [[] for _ in heads]
        for history, head in zip(self.top1, heads):
            history.append(probe_accuracy(head, self.x, self.y)["top1"])
