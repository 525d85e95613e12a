"""Two gloo processes: the RankMe of an `EmbeddingReservoir` is that of every process's rows together."""

from __future__ import annotations

import pytest
import torch

from cmd.diagnostics import EmbeddingReservoir, rankme
from tests.dist_utils import run_distributed

ROWS = {0: 20, 1: 10}  # uneven: the gather pads and trims


def _rows(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(ROWS.values()), 12, generator=g) @ torch.randn(12, 12, generator=g).tril()


def _reservoir_rankme(rank, world):
    reservoir = EmbeddingReservoir(capacity=64, seed=rank)  # 32 rows per process: nothing dropped
    start = sum(ROWS[r] for r in range(rank))
    mine = _rows()[start : start + ROWS[rank]]
    for chunk in mine.split(7):
        reservoir.add(chunk)
    small = EmbeddingReservoir(capacity=8, seed=rank)  # 4 rows per process: a sample of 8 rows in all
    small.add(mine)
    return reservoir.capacity, reservoir.rankme(), small.rows().shape[0], small.rankme()


@pytest.mark.slow
def test_rankme_gathers_the_rows_of_every_process():
    results = run_distributed(_reservoir_rankme, 2)
    expected = rankme(_rows())
    for capacity, value, small_rows, small_value in results:
        assert capacity == 32
        assert value == pytest.approx(expected, rel=1e-6)  # float32 rows: the same matrix
        assert small_rows == 4 and 1.0 <= small_value <= 8.0
    assert results[0][1] == results[1][1] and results[0][3] == results[1][3]  # every process the same value
