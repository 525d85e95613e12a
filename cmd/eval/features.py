"""Feature extraction from a frozen model over a data loader, correct under torch.distributed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from .. import distributed as dist

__all__ = ["extract_features", "loader_batch_indices"]

ForwardFn = Callable[[Any, torch.Tensor], Any]


def loader_batch_indices(loader: DataLoader) -> list[list[int]]:
    """The dataset indices of every batch ``loader`` will yield, read from its batch sampler.

    The sampler must be deterministic: iterating it twice must give the same indices (a
    ``DistributedSampler``, shuffled or not, between two ``set_epoch`` calls; a
    ``SequentialSampler``); a ``RandomSampler`` without a fixed generator is not.

    Raises:
        ValueError: for an iterable-style dataset, a loader without automatic batching, or a
            sampler whose order changes from one pass to the next.
    """
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError("an IterableDataset has no dataset indices: use a map-style dataset with a DistributedSampler")
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:
        raise ValueError("the loader must batch automatically (batch_size set, not None)")
    first = [[int(i) for i in batch] for batch in batch_sampler]
    second = [[int(i) for i in batch] for batch in batch_sampler]
    if first != second:
        raise ValueError(
            "the loader's sampler is not deterministic (two passes gave different indices): use "
            "DistributedSampler(dataset, shuffle=False) for distributed feature extraction"
        )
    return first


def _check_keeps_every_sample(loader: Any) -> None:
    """Raise when ``loader`` would drop its last, partial batch (``drop_last=True``)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    if not getattr(batch_sampler, "drop_last", False):
        return
    batch_size = getattr(batch_sampler, "batch_size", None)
    try:
        n = len(batch_sampler.sampler)
    except (AttributeError, TypeError):
        n = None
    if n is None or not batch_size or n % batch_size:
        raise ValueError(
            f"the loader drops its last batch (drop_last=True, {n} samples, batch size {batch_size}): "
            "features would be missing for some images; use drop_last=False"
        )


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(
            f"the loader must yield (images, labels) or (images, labels, ...), got {type(batch).__name__}"
        )
    images, labels = batch[0], batch[1]
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"the images of a batch must be a tensor [B, C, H, W], got {type(images).__name__}")
    return images, labels


def _as_labels(labels: Any) -> torch.Tensor:
    """A batch's labels as an int64 tensor of class indices (same shape), refusing what a cast would change.

    Strings, non-finite values and non-integer floats (0.9, y + 0.5) raise: ``.long()`` would turn
    them into other classes, or into -2**63, without a word. Floats holding whole numbers (3.0)
    are accepted.
    """
    if isinstance(labels, (str, bytes)) or (
        isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], (str, bytes))
    ):
        first = labels if isinstance(labels, (str, bytes)) else labels[0]
        raise TypeError(f"labels must be integer class indices, got strings such as {first!r}: map the class "
                        "names to indices first (e.g. with the dataset's class_to_idx)")
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"labels must be integer class indices, got {type(labels).__name__}: {err}") from None
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.is_floating_point():
        finite = torch.isfinite(y)
        if not bool(finite.all()):
            raise ValueError(f"labels must be integer class indices, got a non-finite value ({y[~finite][0].item()})")
        fractional = y != y.round()
        if bool(fractional.any()):
            raise ValueError(f"labels must be integer class indices, got {y[fractional][0].item():g} (dtype "
                             f"{y.dtype}): casting would truncate it to another class")
    return y.long()


def _as_features(out: Any, n_images: int) -> torch.Tensor:
    out = getattr(out, "pooled", out)  # a BackboneOutput gives its image vector
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model (or forward) must return a tensor [B, D] or a BackboneOutput, got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != n_images:
        raise ValueError(f"the model (or forward) must return features [B={n_images}, D], got {tuple(out.shape)}")
    return out


def _default_device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return torch.device("cpu")


def extract_features(
    model: Callable[..., Any],
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp: bool = True,
    normalize: bool = True,
    progress: bool = True,
    forward: ForwardFn | None = None,
    desc: str = "extract features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and labels [N] of a whole dataset, from a frozen model.

    Each batch ``(images, labels, *extra)`` of ``loader`` (extra items such as part masks are
    ignored) goes through ``forward(model, images)`` when given, else ``model(images)``; a result
    with a ``.pooled`` attribute (a [`cmd.backbones.BackboneOutput`][cmd.backbones.BackboneOutput]) gives its image vector,
    any other result must be a tensor [B, D]. For example
    ``forward=lambda m, x: m.forward_last_blocks(x, n=4, avgpool=False)`` extracts linear-probe
    features. The model runs in eval mode under ``torch.no_grad`` (its mode is restored after),
    with float16 autocast on CUDA when ``amp`` (ignored on the CPU).

    Under ``torch.distributed`` each process extracts the batches of its own sampler (normally a
    ``DistributedSampler``) and the rows of all processes are gathered **in dataset order without
    duplicates** (the sampler's padding repeats are dropped). The dataset index of every row is read
    from the loader's batch sampler, so datasets need not return their indices, but the sampler must
    be deterministic (`loader_batch_indices`). In a single process the rows keep the loader's
    order (dataset order for an unshuffled loader). In both cases a loader that would drop its last,
    partial batch (``drop_last=True``) raises a ValueError rather than return fewer rows.

    Args:
        model: a module or any callable.
        loader: yields ``(images [B, C, H, W], labels [B], ...)``.
        device: where the images go; defaults to the model's first parameter's device (CPU).
        amp: float16 autocast on CUDA.
        normalize: L2-normalise every feature row (cosine similarity; k-NN and retrieval). Use
            False for linear probing.
        progress: tqdm progress bar (rank 0 only).
        forward: ``forward(model, images)`` choosing what to extract.
        desc: the progress bar's label, e.g. ``"features of the test split"``.

    Returns:
        (features [N, D] float32, labels [N] int64), on the CPU, the same on every process.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10) % 2)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4))
        >>> feats, labels = extract_features(model, DataLoader(data, batch_size=4), progress=False)
        >>> feats.shape, labels.shape
        (torch.Size([10, 4]), torch.Size([10]))
    """
    device = _default_device(model) if device is None else torch.device(device)
    distributed = dist.is_dist() and dist.world_size() > 1
    _check_keeps_every_sample(loader)
    batch_indices = loader_batch_indices(loader) if distributed else None
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if amp and device.type == "cuda"
        else contextlib.nullcontext()
    )
    is_module = isinstance(model, torch.nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        bar = tqdm(loader, desc=desc, disable=not (progress and dist.is_main_process()), leave=False)
        with torch.no_grad(), autocast:
            for step, batch in enumerate(bar):
                images, targets = _split_batch(batch)
                images = images.to(device, non_blocking=True)
                out = forward(model, images) if forward is not None else model(images)
                feats = _as_features(out, images.shape[0]).float()
                if normalize:
                    feats = F.normalize(feats, dim=1)
                targets = _as_labels(targets).reshape(-1).cpu()
                if targets.shape[0] != images.shape[0]:
                    raise ValueError(f"batch {step} has {images.shape[0]} images but {targets.shape[0]} labels")
                if batch_indices is not None and (step >= len(batch_indices) or len(batch_indices[step]) != len(targets)):
                    raise ValueError(f"batch {step} does not match the loader's batch sampler")
                features.append(feats.cpu())
                labels.append(targets)
    finally:
        if is_module and was_training:
            model.train()
    if not features:
        raise ValueError("the loader yielded no batch")
    all_features, all_labels = torch.cat(features), torch.cat(labels)
    if batch_indices is not None:
        if len(batch_indices) != len(features):
            raise ValueError(f"the loader yielded {len(features)} batches but its batch sampler has {len(batch_indices)}")
        indices = torch.tensor([i for batch in batch_indices for i in batch], dtype=torch.long)
        total = len(loader.dataset)
        try:
            all_features = dist.gather_in_dataset_order(all_features.to(device), indices.to(device), total).cpu()
            all_labels = dist.gather_in_dataset_order(all_labels.to(device), indices.to(device), total).cpu()
        except ValueError as err:
            raise ValueError(f"{err} (does the loader drop the last batch? use drop_last=False)") from err
    return all_features, all_labels
