"""Streaming linear probing under 2 gloo processes equals one process seeing the same global batches."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from cmd.eval import train_linear_probe
from tests.dist_utils import run_distributed
from tests.eval.test_linear import Blobs, StandInBackbone


def _val_data() -> Subset:
    return Subset(Blobs(3, seed=2), range(11))  # 11 samples: the sampler pads one repeat


def _probe(rank: int, world_size: int):
    train = Blobs(4, seed=1)  # 16 samples: rank 0 gets 0, 2, 4, ..., rank 1 gets 1, 3, 5, ...
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=False)
    loader = DataLoader(train, batch_size=2, sampler=sampler)
    val_data = _val_data()
    val = DataLoader(val_data, batch_size=5, sampler=DistributedSampler(val_data, shuffle=False))
    out = train_linear_probe(StandInBackbone(), loader, val, epochs=3, lr=0.3, progress=False)
    return out["probe"].state_dict(), out["top1"]


@pytest.mark.distributed
@pytest.mark.slow
def test_gradients_are_averaged_over_processes():
    # one process, global batches {0, 1, 2, 3}, {4, 5, 6, 7}, ... = the union of the two ranks' batches
    train = Blobs(4, seed=1)
    batches = [[4 * s, 4 * s + 2, 4 * s + 1, 4 * s + 3] for s in range(4)]
    single = train_linear_probe(
        StandInBackbone(), DataLoader(train, batch_sampler=batches), DataLoader(_val_data(), batch_size=5),
        epochs=3, lr=0.3, progress=False,
    )
    for state, top1 in run_distributed(_probe, 2):
        for name, value in single["probe"].state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5)
        assert top1 == single["top1"]  # the validation set is gathered without the padding repeat
