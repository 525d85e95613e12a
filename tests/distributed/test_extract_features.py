"""Distributed feature extraction: 2 gloo processes give what one process gives, in dataset order."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cmd.eval import extract_features
from tests.dist_utils import run_distributed

N_SAMPLES = 11  # not divisible by the world size: DistributedSampler pads with repeats


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N_SAMPLES, 3, 4, 4, generator=g)
    labels = torch.randint(0, 5, (N_SAMPLES,), generator=g)
    masks = torch.zeros(N_SAMPLES, 4, 4, dtype=torch.bool)  # an extra item per sample
    return TensorDataset(images, labels, masks)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8))


def _extract(rank: int, world_size: int, shuffle: bool):
    data = _dataset()
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=5)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    feats, labels = extract_features(_model(), loader, progress=True)
    return feats, labels, len(list(iter(sampler)))


def _extract_drop_last(rank: int, world_size: int) -> str:
    data = _dataset()
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True)
    try:
        extract_features(_model(), loader, progress=False)
    except ValueError as err:
        return str(err)
    return "no error"


def _all_cases(rank: int, world_size: int) -> dict:
    """One spawn for every case (spawning costs seconds)."""
    return {
        "ordered": _extract(rank, world_size, shuffle=False),
        "shuffled": _extract(rank, world_size, shuffle=True),
        "drop_last": _extract_drop_last(rank, world_size),
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_equal_one_in_dataset_order():
    data = _dataset()
    expected_feats, expected_labels = extract_features(_model(), DataLoader(data, batch_size=3), progress=False)
    assert torch.equal(expected_labels, data.tensors[1])
    results = run_distributed(_all_cases, 2)
    for rank_result in results:
        for case in ("ordered", "shuffled"):
            feats, labels, local = rank_result[case]
            assert local == 6  # each process saw 6 samples, one of them a padding repeat
            assert feats.shape == (N_SAMPLES, 8)
            torch.testing.assert_close(feats, expected_feats, rtol=1e-5, atol=1e-6)
            assert torch.equal(labels, expected_labels)
        assert "drop_last=False" in rank_result["drop_last"]
