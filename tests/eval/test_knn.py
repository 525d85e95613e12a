"""KNNClassifier and InnerProductSearch against straightforward implementations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmd.eval import InnerProductSearch, KNNClassifier

BACKENDS = ["faiss", "torch", "auto"]


def reference_knn(train, train_y, test, test_y, k, temperature, num_classes):
    """DINO's weighted vote with explicit loops, in float64; ties by lowest index everywhere."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k = min(k, len(train))
    top1_hits, top5_hits = [], []
    for q, label in zip(test, test_y):
        sims = [float(np.dot(t, q)) for t in train]
        neighbours = sorted(range(len(train)), key=lambda j: (-sims[j], j))[:k]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[int(train_y[j])] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1_hits.append(ranking[0] == label)
        top5_hits.append(label in ranking[: min(5, k)])
    per_class = {}
    for hit, label in zip(top1_hits, test_y):
        per_class.setdefault(int(label), []).append(hit)
    return {
        "top1": 100.0 * np.mean(top1_hits),
        "top5": 100.0 * np.mean(top5_hits),
        "mean_per_class_top1": 100.0 * np.mean([np.mean(v) for v in per_class.values()]),
    }


def _data(n_train=60, n_test=25, dim=16, n_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    train_y = torch.arange(n_train) % n_classes
    test_y = torch.randint(0, n_classes, (n_test,), generator=g)
    train = centres[train_y] + 1.5 * torch.randn(n_train, dim, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(n_test, dim, generator=g)
    return train, train_y, test, test_y


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_for_k_up_to_train_size(backend):
    train, train_y, test, test_y = _data()
    ks = (1, 3, 5, 10, 59, 60)
    knn = KNNClassifier(k=ks, temperature=0.07, backend=backend, batch_size=7).fit(train, train_y)
    results = knn.evaluate(test, test_y)
    assert set(results) == set(ks)
    for k in ks:
        expected = reference_knn(train, train_y, test, test_y, k, 0.07, 6)
        for metric, value in expected.items():
            assert results[k][metric] == pytest.approx(value, abs=1e-9), (k, metric)
    # the test must be able to fail: the metrics are not all trivially equal across k
    assert len({round(results[k]["top1"], 6) for k in ks}) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_above_train_size_warns_and_clamps(backend):
    train, train_y, test, test_y = _data(n_train=12, n_test=9)
    knn = KNNClassifier(k=(12, 50), backend=backend).fit(train, train_y)
    with pytest.warns(UserWarning, match="clamped to 12"):
        results = knn.evaluate(test, test_y)
    assert results[50] == results[12]
    assert results[50] == pytest.approx(reference_knn(train, train_y, test, test_y, 50, 0.07, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seven_test_samples(backend):
    train, train_y, test, test_y = _data(n_test=7)
    results = KNNClassifier(k=(10, 20), backend=backend).fit(train, train_y).evaluate(test, test_y)
    for k in (10, 20):
        assert results[k] == pytest.approx(reference_knn(train, train_y, test, test_y, k, 0.07, 6))


def test_backends_agree_on_predictions():
    train, train_y, test, _ = _data(n_train=200, n_test=50, dim=32, n_classes=10)
    a = KNNClassifier(k=(1, 20), backend="faiss").fit(train, train_y).predict(test)
    b = KNNClassifier(k=(1, 20), backend="torch", batch_size=8).fit(train, train_y).predict(test)
    for k in (1, 20):
        assert torch.equal(a[k], b[k])
        assert a[k].shape == (50, min(5, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vote_ties_go_to_the_lowest_class(backend):
    # two identical training points of classes 3 and 1 tie exactly for a query on them
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    train_y = torch.tensor([3, 1, 0])
    knn = KNNClassifier(k=(2, 3), num_classes=5, backend=backend).fit(train, train_y)
    pred = knn.predict(torch.tensor([[1.0, 0.0]]))
    assert pred[2].tolist() == [[1, 3]]
    # k = 3: classes 1 and 3 tie at the top, class 0 has the smallest vote
    assert pred[3].tolist() == [[1, 3, 0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_stays_finite(backend):
    # exp(sim / T) overflows float64 at T = 1e-4; the vote must still follow the nearest neighbour
    train, train_y, test, _ = _data()
    knn = KNNClassifier(k=(20,), temperature=1e-4, backend=backend).fit(train, train_y)
    nearest = KNNClassifier(k=(1,), backend=backend).fit(train, train_y).predict(test)[1][:, 0]
    assert torch.equal(knn.predict(test)[20][:, 0], nearest)


def test_missing_test_classes_and_per_class_mean():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 2])
    knn = KNNClassifier(k=1, backend="torch").fit(train, train_y)
    # class 0: 2 of 2 right; class 1: 0 of 1 right (query nearest to class 2); class 2 absent
    test = torch.tensor([[1.0, 0.1], [0.9, -0.1], [-1.0, 0.2]])
    results = knn.evaluate(test, torch.tensor([0, 0, 1]))[1]
    assert results["top1"] == pytest.approx(200 / 3)
    assert results["mean_per_class_top1"] == pytest.approx(50.0)
    assert results["top5"] == results["top1"]  # k = 1: top-5 is over one class


def test_num_classes_inferred_and_checked():
    train, train_y, test, test_y = _data()
    knn = KNNClassifier(k=5, backend="torch").fit(train, train_y)
    with pytest.raises(ValueError, match="num_classes=6"):
        knn.evaluate(test, torch.full_like(test_y, 6))
    with pytest.raises(ValueError, match="num_classes=3"):
        KNNClassifier(k=5, num_classes=3).fit(train, train_y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_clear_errors(backend):
    train, train_y, test, test_y = _data()
    knn = KNNClassifier(k=5, backend=backend)
    with pytest.raises(RuntimeError, match="fit"):
        knn.evaluate(test, test_y)
    bad = train.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*row 3"):
        knn.fit(bad, train_y)
    with pytest.raises(ValueError, match="59 entries but train_features has 60"):
        knn.fit(train, train_y[:-1])
    knn.fit(train, train_y)
    with pytest.raises(ValueError, match="D = 16"):
        knn.evaluate(test[:, :8], test_y)
    with pytest.raises(ValueError, match="test_labels has 24"):
        knn.evaluate(test, test_y[:-1])
    with pytest.raises(ValueError, match="integer"):
        knn.fit(train, train_y.float())
    for bad_k in (0, (), (5, -1)):
        with pytest.raises(ValueError, match="k must"):
            KNNClassifier(k=bad_k)
    with pytest.raises(ValueError, match="temperature"):
        KNNClassifier(temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        KNNClassifier(backend="annoy")


def test_label_fraction_keeps_a_balanced_seeded_subset():
    train, train_y, test, test_y = _data(n_train=60)
    knn = KNNClassifier(k=5, backend="torch").fit(train, train_y, label_fraction=0.5, seed=3)
    assert knn.num_train == 30
    again = KNNClassifier(k=5, backend="torch").fit(train, train_y, label_fraction=0.5, seed=3)
    assert again.evaluate(test, test_y) == knn.evaluate(test, test_y)
    assert torch.bincount(knn._train_labels).tolist() == [5] * 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 5, 1000])
def test_search_equals_brute_force(backend, batch_size):
    g = torch.Generator().manual_seed(1)
    db, queries = torch.randn(53, 8, generator=g), torch.randn(11, 8, generator=g)
    search = InnerProductSearch(db, backend=backend, batch_size=batch_size, database_chunk=7)
    sims, ids = search.search(queries, 10)
    for q in range(11):
        scores = [float(db[j] @ queries[q]) for j in range(53)]
        expected = sorted(range(53), key=lambda j: (-scores[j], j))[:10]
        assert ids[q].tolist() == expected
        assert sims[q].tolist() == pytest.approx([scores[j] for j in expected], abs=1e-5)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 53\]"):
        search.search(queries, 54)
