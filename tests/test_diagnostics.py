"""cmd.diagnostics: RankMe against a direct numpy implementation, and the reservoir's sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmd.diagnostics import EmbeddingReservoir, rankme


def _rankme_numpy(x: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al.'s RankMe, written out: the singular values by numpy, the entropy by a Python sum."""
    sigma = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    total = sum(float(s) for s in sigma)
    p = [float(s) / total + eps for s in sigma]
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("shape", [(2048, 128), (50, 200), (7, 3), (1, 5)])
def test_rankme_matches_numpy(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) @ torch.randn(shape[1], shape[1], generator=g).tril()
    assert rankme(x) == pytest.approx(_rankme_numpy(x.numpy()), rel=1e-9)


def test_rankme_known_values():
    assert rankme(torch.eye(16)) == pytest.approx(16.0, rel=1e-5)
    assert rankme(torch.ones(32, 8)) == pytest.approx(1.0, abs=1e-4)  # one direction: collapsed
    low = torch.randn(500, 4) @ torch.randn(4, 64)  # rank 4 in 64 dimensions
    assert 1.0 < rankme(low) <= 4.0 + 1e-3
    assert rankme(torch.zeros(3, 4)) == 0.0
    # float16 / float32 inputs are computed in float64: scaling does not change the rank
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    assert rankme(1e-3 * x) == pytest.approx(rankme(x), rel=1e-9)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(0, 3), torch.zeros(2, 3, 4),
                                 torch.tensor([[1.0, float("nan")]]), [[1.0, 2.0]]])
def test_rankme_refuses_bad_input(bad):
    with pytest.raises(ValueError, match="rankme"):
        rankme(bad)


def test_reservoir_keeps_the_first_rows_until_full():
    r = EmbeddingReservoir(capacity=10, seed=0)
    r.add(torch.arange(12.0).view(6, 2))
    assert torch.equal(r.rows(), torch.arange(12.0).view(6, 2))
    r.add(torch.arange(12.0, 20.0).view(4, 2))
    assert r.seen == 10 and torch.equal(r.rows(), torch.arange(20.0).view(10, 2))


def test_reservoir_is_a_uniform_sample():
    """Every row of a 200-row stream lands in a 20-row reservoir with probability 20/200 (2000 trials)."""
    hits = np.zeros(200)
    for trial in range(2000):
        r = EmbeddingReservoir(capacity=20, seed=trial)
        for start in range(0, 200, 32):  # batches of 32, the last one short
            rows = torch.arange(start, min(start + 32, 200), dtype=torch.float32)[:, None]
            r.add(rows)
        kept = r.rows()[:, 0].long().numpy()
        assert len(set(kept.tolist())) == 20  # no row twice
        hits[kept] += 1
    freq = hits / 2000
    assert abs(freq.mean() - 0.1) < 1e-12
    # binomial(2000, 0.1): sd 0.0067 per row; early, middle and late rows alike
    assert np.abs(freq - 0.1).max() < 0.035
    assert abs(freq[:32].mean() - freq[-32:].mean()) < 0.01


def test_reservoir_reset_and_errors():
    r = EmbeddingReservoir(capacity=4, seed=3)
    assert r.rankme() is None and r.rows().shape == (0, 0)
    r.add(torch.randn(8, 3))
    r.reset(seed=4)
    assert r.seen == 0 and r.rankme() is None
    r.add(torch.randn(2, 3))
    with pytest.raises(ValueError, match="columns"):
        r.add(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        r.add(torch.randn(3))
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingReservoir(capacity=0)
