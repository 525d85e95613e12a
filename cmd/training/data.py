"""Resumable, seeded multi-crop data: the crops of image i in epoch e depend only on (seed, e, i).

`SeededMultiCrop` draws the augmentation of each image from a generator seeded by ``(seed, epoch,
index)``, and `EpochIndexSampler` yields ``(epoch, index)`` keys in an order that depends only on
``(seed, epoch)``. A run resumed from a checkpoint (even mid-epoch) therefore sees exactly the
crops of the uninterrupted run, whatever the number of data-loading workers.

One `DataLoader` iteration can span several epochs (``set_epochs(start, stop)``): each epoch yields
whole batches only, so no batch straddles two epochs, and the loader's workers prefetch the next
epoch's first batches while the current one ends (no throughput dip at epoch starts). Split the
stream by epoch with `epoch_batches`.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, DistributedSampler
    >>> images = [(torch.full((3, 4, 4), float(i)), i % 2) for i in range(10)]
    >>> data = SeededMultiCrop(images, transform=lambda x: [x, x.flip(-1)], seed=0)
    >>> sampler = EpochIndexSampler(DistributedSampler(data, num_replicas=1, rank=0, seed=0), batch_size=4)
    >>> sampler.set_epochs(0, 3)  # epochs 0, 1, 2 in one pass: 2 batches of 4 per epoch
    >>> loader = DataLoader(data, sampler=sampler, batch_size=4)
    >>> [len(list(epoch)) for epoch in epoch_batches(iter(loader), [2, 2, 2])]
    [2, 2, 2]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["EpochIndexSampler", "SeededMultiCrop", "epoch_batches"]

T = TypeVar("T")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of image ``index`` in ``epoch`` (a fixed mixing of the three integers)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class SeededMultiCrop(Dataset):
    """Applies an augmentation with the global generator seeded by ``(seed, epoch, index)``.

    The augmentation of an image then depends neither on the worker that loads it nor on what was
    loaded before. Keys are ``(epoch, index)`` pairs (from `EpochIndexSampler`), so persistent
    data-loading workers need no per-epoch state. The caller's random state is left untouched
    (``torch.random.fork_rng``).

    Args:
        dataset: yields ``(image, label, ...)`` per index (extra fields are dropped).
        transform: e.g. a `cmd.MultiCropAugmentation`: image -> list of crops ``[3, H, W]``.
        seed: the run's seed.

    Example:
        >>> data = SeededMultiCrop([("img", 3)], transform=lambda x: [x], seed=0)
        >>> data[(0, 0)]
        (['img'], 3)
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any], seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, Any]:
        try:
            epoch, index = key
        except (TypeError, ValueError):
            raise TypeError(
                f"SeededMultiCrop is indexed by (epoch, index) pairs (use EpochIndexSampler), got {key!r}"
            ) from None
        item = self.dataset[index]
        image, label = item[0], item[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, epoch, index))
            crops = self.transform(image)
        return crops, label


class EpochIndexSampler(Sampler):
    """Yields ``(epoch, index)`` keys from a `DistributedSampler`, epoch after epoch.

    ``set_epoch(epoch, skip)`` selects one epoch; ``set_epochs(start, stop, skip)`` the epochs
    ``start .. stop - 1`` in one pass (one DataLoader iteration, workers kept busy across the
    boundaries). Each epoch's order depends only on the sampler's seed and the epoch; ``skip``
    drops the first indices of the first epoch (what a resumed run has already trained on).

    With ``batch_size``, each epoch yields only whole batches (its tail of fewer than
    ``batch_size`` indices is dropped, as ``DataLoader(drop_last=True)`` drops it per epoch), so a
    DataLoader batching the stream never puts two epochs in one batch.

    Args:
        sampler: the per-process order (``shuffle=True, seed=SEED, drop_last=True`` in the program).
        batch_size: per-process batch size, or None to yield every index.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int | None = None) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.sampler = sampler
        self.batch_size = None if batch_size is None else int(batch_size)
        self.epoch, self.stop, self.skip = 0, 1, 0

    @property
    def epoch_length(self) -> int:
        """Indices yielded per whole epoch (whole batches only when ``batch_size`` is set)."""
        n = len(self.sampler)
        return n if self.batch_size is None else n - n % self.batch_size

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Iterate over ``epoch`` only, skipping its first ``skip`` indices."""
        self.set_epochs(epoch, epoch + 1, skip)

    def set_epochs(self, start: int, stop: int, skip: int = 0) -> None:
        """Iterate over the epochs ``start .. stop - 1``, skipping the first ``skip`` indices of ``start``."""
        if stop < start or skip < 0:
            raise ValueError(f"need start <= stop and skip >= 0, got start={start}, stop={stop}, skip={skip}")
        self.sampler.set_epoch(start)
        self.epoch, self.stop, self.skip = int(start), int(stop), int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for epoch in range(self.epoch, self.stop):
            self.sampler.set_epoch(epoch)  # the sampler is iterated in the main process
            skip = self.skip if epoch == self.epoch else 0
            for index in itertools.islice(self.sampler, skip, self.epoch_length):
                yield epoch, index

    def __len__(self) -> int:
        return max(0, (self.stop - self.epoch) * self.epoch_length - self.skip)


def epoch_batches(batches: Iterator[T], counts: Iterable[int]) -> Iterator[Iterator[T]]:
    """Split one iterator of batches into consecutive chunks of ``counts[i]`` batches (one per epoch).

    Each chunk must be consumed (or abandoned for good) before the next is taken.

    Example:
        >>> [list(chunk) for chunk in epoch_batches(iter(range(5)), [2, 3])]
        [[0, 1], [2, 3, 4]]
    """
    for count in counts:
        yield itertools.islice(batches, count)

