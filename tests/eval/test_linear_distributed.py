"""The linear probe's lr selection under 2 gloo processes equals one process (cached and streaming)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cmd.eval import train_linear_probe
from tests.dist_utils import run_distributed
from tests.eval.test_linear import Blobs, StandInBackbone

RATES = [1e-3, 0.05, 0.5]


def _cached(rank: int, world_size: int):
    train, test = Blobs(10, seed=1), Blobs(7, seed=2)  # 40 and 28 samples
    loaders = [DataLoader(d, batch_size=6, sampler=DistributedSampler(d, num_replicas=world_size, rank=rank,
                                                                      shuffle=False)) for d in (train, test)]
    out = train_linear_probe(StandInBackbone(), *loaders, epochs=3, lrs=RATES, batch_size=8, cache_features=True,
                             val_fraction=0.2, progress=False)
    return {k: v for k, v in out.items() if k != "probe"}, out["probe"].state_dict()


def _streaming_validation(rank: int, world_size: int):
    """Streaming: each process trains on its shard (gradients averaged); the held-out split is gathered."""
    train, test = Blobs(10, seed=1), Blobs(7, seed=2)
    loader = DataLoader(train, batch_size=4, sampler=DistributedSampler(train, shuffle=True, seed=0))
    test_loader = DataLoader(test, batch_size=5, sampler=DistributedSampler(test, shuffle=False))
    out = train_linear_probe(StandInBackbone(), loader, test_loader, epochs=2, lrs=RATES, val_fraction=0.2,
                             progress=False)
    return {k: v for k, v in out.items() if k != "probe"}, out["probe"].state_dict()


@pytest.mark.distributed
@pytest.mark.slow
def test_cached_selection_does_not_depend_on_the_number_of_processes():
    single = train_linear_probe(StandInBackbone(), DataLoader(Blobs(10, seed=1), batch_size=6),
                                DataLoader(Blobs(7, seed=2), batch_size=6), epochs=3, lrs=RATES, batch_size=8,
                                cache_features=True, val_fraction=0.2, progress=False)
    for summary, state in run_distributed(_cached, 2):
        assert summary == {k: v for k, v in single.items() if k != "probe"}
        for name, value in single["probe"].state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_streaming_selection_agrees_across_processes():
    (a, state_a), (b, state_b) = run_distributed(_streaming_validation, 2)
    assert a == b and a["num_val"] == 8 and a["num_train"] == 40 and set(a["per_lr"]) == set(RATES)
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name])
