"""Retrieval metrics against hand-computed values and a loop implementation written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmd.eval import fine_grained_retrieval_split, retrieval_metrics

BACKENDS = ["faiss", "torch"]


def reference_retrieval(query, query_labels, gallery, gallery_labels, ranks, map_at, exclude_self=False):
    """Loops in float64; ranking by decreasing cosine similarity, ties by increasing gallery index."""
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    rank_hits = {r: [] for r in ranks}
    ap_at, ap_full = [], []
    for i in range(len(q)):
        candidates = [j for j in range(len(g)) if not (exclude_self and j == i)]
        sims = {j: float(np.dot(q[i], g[j])) for j in candidates}
        order = sorted(candidates, key=lambda j: (-sims[j], j))
        relevant = [int(gallery_labels[j]) == int(query_labels[i]) for j in order]
        for r in ranks:
            rank_hits[r].append(any(relevant[:r]))

        def ap(rel, normaliser):
            hits, total = 0, 0.0
            for position, is_pos in enumerate(rel, start=1):
                if is_pos:
                    hits += 1
                    total += hits / position
            return total / normaliser if normaliser else 0.0

        top = relevant[:map_at]
        ap_at.append(ap(top, sum(top)))
        ap_full.append(ap(relevant, sum(relevant)))
    out = {f"rank{r}": 100.0 * np.mean(v) for r, v in rank_hits.items()}
    out[f"mAP@{map_at}"] = 100.0 * np.mean(ap_at)
    out["mAP"] = 100.0 * np.mean(ap_full)
    return out


def test_hand_computed_with_ties():
    # query [1, 0] of class 0. Gallery sims: g0 0 (class 0), g1 1 (class 1), g2 1 (class 0),
    # g3 -1 (class 0). Ranking with the tie g1 = g2 broken by index: g1, g2, g0, g3.
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    gallery_labels = [0, 1, 0, 0]
    for backend in BACKENDS:
        for map_at, expected_ap_at in ((2, 1 / 2), (3, (1 / 2 + 2 / 3) / 2)):
            out = retrieval_metrics(query, [0], gallery, gallery_labels, ranks=(1, 2), map_at=map_at, backend=backend)
            assert out["rank1"] == 0.0
            assert out["rank2"] == 100.0
            assert out[f"mAP@{map_at}"] == pytest.approx(100 * expected_ap_at, abs=1e-4)
            assert out["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 3 / 4) / 3, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_positive_in_the_top_100(backend):
    # 120 negatives right next to the query, 30 positives far away
    g = torch.Generator().manual_seed(0)
    query = torch.tensor([[1.0, 0.0, 0.0]])
    near = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(120, 3, generator=g)
    far = torch.tensor([0.0, 1.0, 0.0]) + 0.01 * torch.randn(30, 3, generator=g)
    gallery = torch.cat([near, far])
    labels = [1] * 120 + [0] * 30
    out = retrieval_metrics(query, [0], gallery, labels, backend=backend)
    assert out["rank1"] == 0.0 and out["rank5"] == 0.0
    assert out["mAP@100"] == 0.0
    # the positives sit at ranks 121..150 of the full ranking
    expected = np.mean([i / (120 + i) for i in range(1, 31)])
    assert out["mAP"] == pytest.approx(100 * expected, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_matches_reference_on_random_data(backend, exclude_self):
    g = torch.Generator().manual_seed(2)
    n, dim, n_classes = 40, 8, 5
    labels = torch.randint(0, n_classes, (n,), generator=g)
    feats = torch.randn(n_classes, dim, generator=g)[labels] + 1.2 * torch.randn(n, dim, generator=g)
    if exclude_self:
        query, query_labels, gallery, gallery_labels = feats, labels, feats, labels
    else:
        query, query_labels, gallery, gallery_labels = feats[:13], labels[:13], feats[13:], labels[13:]
    out = retrieval_metrics(
        query, query_labels, gallery, gallery_labels, ranks=(1, 3, 5), map_at=10,
        exclude_self=exclude_self, backend=backend, batch_size=4,
    )
    expected = reference_retrieval(query, query_labels, gallery, gallery_labels, (1, 3, 5), 10, exclude_self)
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-4), key


def test_exclude_self_drops_the_query_itself():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = [0, 1, 1]
    with_self = retrieval_metrics(feats, labels, feats, labels, ranks=(1,), map_at=3)
    without = retrieval_metrics(feats, labels, feats, labels, ranks=(1,), map_at=3, exclude_self=True)
    assert with_self["rank1"] == 100.0  # everything finds itself first
    # without itself: query 0 (class 0) has no positive left; query 1 finds item 0 (class 0) first,
    # query 2 finds item 1 (class 1) first
    assert without["rank1"] == pytest.approx(100 / 3)
    assert without["mAP"] == pytest.approx(100 * (0 + 1 / 2 + 1) / 3, abs=1e-4)


def test_cutoffs_above_the_gallery_size():
    gallery = torch.eye(3)
    out = retrieval_metrics(torch.tensor([[0.0, 0.0, 1.0]]), [2], gallery, [0, 1, 2], ranks=(1, 10))
    assert out == {"rank1": 100.0, "rank10": 100.0, "mAP@100": 100.0, "mAP": 100.0}


def test_bad_inputs():
    feats = torch.randn(6, 4)
    labels = [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="Q == G"):
        retrieval_metrics(feats[:2], labels[:2], feats, labels, exclude_self=True)
    with pytest.raises(ValueError, match=r"D = 3 columns \(as query\)"):
        retrieval_metrics(feats[:, :3], labels, feats, labels)
    bad = feats.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="gallery contains NaN or inf"):
        retrieval_metrics(feats, labels, bad, labels)
    with pytest.raises(ValueError, match="gallery_labels has 5"):
        retrieval_metrics(feats, labels, feats, labels[:5])
    with pytest.raises(ValueError, match="ranks"):
        retrieval_metrics(feats, labels, feats, labels, ranks=(0,))
    with pytest.raises(ValueError, match="map_at"):
        retrieval_metrics(feats, labels, feats, labels, map_at=0)


def test_fine_grained_split_every_ninth_test_image():
    train = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)
    test = 100 + torch.arange(20, dtype=torch.float32)[:, None].repeat(1, 2)
    train_y, test_y = torch.arange(8), 100 + torch.arange(20)
    query, query_y, gallery, gallery_y = fine_grained_retrieval_split(train, train_y, test, test_y)
    assert query_y.tolist() == [100, 109, 118]
    assert query[:, 0].tolist() == [100.0, 109.0, 118.0]
    expected_gallery = list(range(8)) + [100 + i for i in range(20) if i % 9 != 0]
    assert gallery_y.tolist() == expected_gallery
    assert gallery[:, 0].tolist() == [float(v) if v < 100 else float(v) for v in expected_gallery]
    with pytest.raises(ValueError, match="every"):
        fine_grained_retrieval_split(train, train_y, test, test_y, every=0)
