"""Backend choice of the k-NN / retrieval search and the approximate faiss IVF index."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cmd.eval import InnerProductSearch, KNNClassifier, choose_backend, retrieval_metrics
from cmd.eval.search import AUTO_FAISS_MAX_WORK


def _clustered(n: int, dim: int, n_classes: int, seed: int, noise: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, dim, generator=g), dim=1), y


def _exact_topk(db, q, k):
    """Straightforward reference: the whole similarity matrix, then a sort by (-sim, id)."""
    sims = q.double() @ db.double().T
    order = torch.stack([torch.tensor(sorted(range(db.shape[0]), key=lambda j: (-float(row[j]), j))) for row in sims])
    return order[:, :k]


@pytest.mark.parametrize(
    ("rows", "dim", "device", "expected"),
    [
        (50_000, 768, "cpu", "torch"),
        (20_000, 768, "cpu", "torch"),
        (2_000, 128, "cpu", "faiss"),
        (AUTO_FAISS_MAX_WORK // 100, 100, "cpu", "faiss"),
        (AUTO_FAISS_MAX_WORK // 100 + 1, 100, "cpu", "torch"),
        (10, 8, "cuda", "torch"),
        (10_000_000, 768, torch.device("cuda", 0), "torch"),
    ],
)
def test_choose_backend_follows_the_documented_rule(rows, dim, device, expected):
    assert choose_backend(rows, dim, device) == expected


def test_auto_backend_resolves_by_size():
    small = InnerProductSearch(torch.randn(100, 16))
    large = InnerProductSearch(torch.randn(AUTO_FAISS_MAX_WORK // 16 + 1, 16))
    assert small.backend == "faiss" and large.backend == "torch"
    assert KNNClassifier().backend == "auto"
    knn = KNNClassifier(k=1).fit(torch.randn(30, 4), torch.arange(30) % 3)
    assert knn._search.backend == "faiss"


@pytest.mark.parametrize("backend", ["auto", "torch", "faiss"])
def test_exact_backends_equal_the_reference(backend):
    db, _ = _clustered(300, 12, 5, seed=1)
    q, _ = _clustered(20, 12, 5, seed=2)
    sims, ids = InnerProductSearch(db, backend=backend, batch_size=7).search(q, 15)
    assert torch.equal(ids.cpu(), _exact_topk(db, q, 15))
    torch.testing.assert_close(sims.cpu(), (q @ db.T).gather(1, ids.cpu()))


def test_ivf_scanning_every_list_is_exact():
    db, _ = _clustered(2000, 16, 10, seed=3)
    q, _ = _clustered(50, 16, 10, seed=4)
    ivf = InnerProductSearch(db, backend="faiss_ivf", nlist=8, nprobe=8)
    sims, ids = ivf.search(q, 10)
    assert torch.equal(ids, _exact_topk(db, q, 10))
    exact_sims, _ = InnerProductSearch(db, backend="torch").search(q, 10)
    torch.testing.assert_close(sims, exact_sims)


def test_ivf_recall_is_high_on_clustered_data():
    db, _ = _clustered(4000, 32, 20, seed=5)
    q, _ = _clustered(200, 32, 20, seed=6)
    k = 10
    ivf = InnerProductSearch(db, backend="faiss_ivf", nprobe=8)
    assert ivf.nlist == min(round(4000**0.5), 4000 // 39)  # the documented default
    _, approx = ivf.search(q, k)
    _, exact = InnerProductSearch(db, backend="torch").search(q, k)
    recall = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
    assert recall >= 0.9, recall


def test_ivf_knn_and_retrieval_close_to_exact():
    train, train_y = _clustered(3000, 32, 10, seed=7)
    test, test_y = _clustered(300, 32, 10, seed=8)
    exact = KNNClassifier(k=(10, 20), backend="torch").fit(train, train_y).evaluate(test, test_y)
    approx = KNNClassifier(k=(10, 20), backend="faiss_ivf", nprobe=4).fit(train, train_y).evaluate(test, test_y)
    for k in (10, 20):
        assert abs(exact[k]["top1"] - approx[k]["top1"]) <= 2.0
    r_exact = retrieval_metrics(test, test_y, train, train_y, backend="torch")
    r_approx = retrieval_metrics(test, test_y, train, train_y, backend="faiss_ivf")
    assert abs(r_exact["rank1"] - r_approx["rank1"]) <= 2.0
    assert r_approx["mAP"] == pytest.approx(r_exact["mAP"])  # the full mAP stays exact


def test_ivf_missing_neighbours_are_marked_and_weigh_nothing():
    # one list probed out of many: a query can find fewer than k rows
    db, y = _clustered(400, 8, 4, seed=9, noise=0.05)
    ivf = InnerProductSearch(db, backend="faiss_ivf", nlist=10, nprobe=1)
    sims, ids = ivf.search(db[:5], 200)
    missing = ids < 0
    assert missing.any()
    assert torch.isneginf(sims[missing]).all() and torch.isfinite(sims[~missing]).all()
    knn = KNNClassifier(k=200, backend="faiss_ivf", nlist=10, nprobe=1).fit(db, y)
    ranked = knn.predict(db[:20])[200]
    assert (ranked[:, 0] == y[:20]).float().mean() >= 0.9


def test_bad_backend_options():
    db = torch.randn(50, 4)
    with pytest.raises(ValueError, match="backend"):
        InnerProductSearch(db, backend="annoy")
    with pytest.raises(ValueError, match="backend"):
        KNNClassifier(backend="gpu")
    with pytest.raises(ValueError, match="nprobe"):
        InnerProductSearch(db, backend="faiss_ivf", nprobe=0)
    with pytest.raises(ValueError, match="nlist"):
        InnerProductSearch(db, backend="faiss_ivf", nlist=0)
    with pytest.raises(ValueError, match="nlist"):
        InnerProductSearch(db, backend="faiss_ivf", nlist=51)
