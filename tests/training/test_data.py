"""cmd.training.data: one loader pass over several epochs gives the batches of one pass per epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cmd.training import EpochIndexSampler, SeededMultiCrop, epoch_batches


class _Images(torch.utils.data.Dataset):
    """Index i -> (a [3, 8, 8] image with value i, label i % 3)."""

    def __len__(self) -> int:
        return 21

    def __getitem__(self, i):
        return torch.full((3, 8, 8), float(i)), i % 3


def _augment(image: torch.Tensor) -> list[torch.Tensor]:  # random: draws from the global generator
    return [image + torch.rand(()), image.flip(-1) * torch.rand(())]


def _collate(batch):
    crops = [torch.stack([b[0][j] for b in batch]) for j in range(2)]
    return crops, torch.tensor([b[1] for b in batch])


def _loader(data, sampler, workers: int) -> DataLoader:
    return DataLoader(data, sampler=sampler, batch_size=4, drop_last=True, collate_fn=_collate, num_workers=workers)


def _per_epoch_reference(data, epochs: range, skip: int) -> list:
    """The old loop: a new loader iteration per epoch, each epoch's tail dropped by the DataLoader."""
    sampler = EpochIndexSampler(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=True))
    batches = []
    for epoch in epochs:
        sampler.set_epoch(epoch, skip=skip if epoch == epochs.start else 0)
        batches.append(list(_loader(data, sampler, 0)))
    return batches


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("skip_batches", [0, 2])
def test_one_pass_over_epochs_equals_one_pass_per_epoch(workers, skip_batches):
    data = SeededMultiCrop(_Images(), _augment, seed=7)
    sampler = EpochIndexSampler(DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3,
                                                   drop_last=True), batch_size=4)
    assert sampler.epoch_length == 20  # 21 images: 5 whole batches of 4 per epoch
    sampler.set_epochs(1, 4, skip=4 * skip_batches)
    loader = _loader(data, sampler, workers)
    assert len(loader) == 3 * 5 - skip_batches
    counts = [5 - skip_batches, 5, 5]
    got = [list(chunk) for chunk in epoch_batches(iter(loader), counts)]
    want = _per_epoch_reference(data, range(1, 4), 4 * skip_batches)
    assert [len(e) for e in got] == [len(e) for e in want] == counts
    for epoch_got, epoch_want in zip(got, want):
        for (crops_a, labels_a), (crops_b, labels_b) in zip(epoch_got, epoch_want):
            assert torch.equal(labels_a, labels_b)
            for a, b in zip(crops_a, crops_b):
                assert torch.equal(a, b)


def test_epochs_never_share_a_batch_and_orders_differ():
    sampler = EpochIndexSampler(DistributedSampler(range(10), num_replicas=1, rank=0, shuffle=True, seed=0,
                                                   drop_last=True), batch_size=4)
    sampler.set_epochs(0, 2)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 16
    assert [e for e, _ in keys] == [0] * 8 + [1] * 8
    assert [i for _, i in keys[:8]] != [i for _, i in keys[8:]]
    sampler.set_epoch(1)
    assert list(sampler) == keys[8:]


def test_crops_depend_only_on_seed_epoch_index():
    data = SeededMultiCrop(_Images(), _augment, seed=7)
    torch.manual_seed(123)
    first = data[(2, 5)]
    torch.rand(10)  # whatever happened before
    again = data[(2, 5)]
    assert all(torch.equal(a, b) for a, b in zip(first[0], again[0]))
    assert not torch.equal(data[(3, 5)][0][0], first[0][0])
    with pytest.raises(TypeError, match=r"\(epoch, index\)"):
        data[5]


def test_bad_arguments():
    base = DistributedSampler(range(10), num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="batch_size"):
        EpochIndexSampler(base, batch_size=0)
    with pytest.raises(ValueError, match="start <= stop"):
        EpochIndexSampler(base).set_epochs(3, 2)
