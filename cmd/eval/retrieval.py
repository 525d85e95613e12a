"""Image retrieval metrics on frozen features: Rank-k, mAP@k and full mAP (cosine similarity)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .knn import check_labels
from .search import Backend, InnerProductSearch, check_features, sort_by_similarity_then_index

__all__ = ["retrieval_metrics", "fine_grained_retrieval_split", "average_precision"]

# elements of one [queries x gallery] block of the full-mAP pass (about 64 MiB of float32)
_FULL_MAP_BLOCK = 1 << 24


def average_precision(relevant: torch.Tensor, num_positives: torch.Tensor | None = None) -> torch.Tensor:
    """Average precision of ranked lists.

    Args:
        relevant: [Q, L] bool, ``relevant[q, r]`` is True when the item at rank r + 1 of query q
            has the query's class.
        num_positives: [Q] the normaliser; defaults to the positives found in the L ranks (the
            mAP@L convention). A query with no positive gets 0.

    Returns:
        [Q] float32 AP = (1 / n) sum over the positives at ranks r_1 < r_2 < ... of i / r_i.

    Example:
        >>> round(float(average_precision(torch.tensor([[True, False, True]]))), 4)  # (1/1 + 2/3) / 2
        0.8333
    """
    rel = relevant.float()
    ranks = torch.arange(1, rel.shape[1] + 1, dtype=torch.float32, device=rel.device)
    precision_at_hits = rel.cumsum(dim=1) / ranks * rel
    n = rel.sum(dim=1) if num_positives is None else num_positives.float()
    return precision_at_hits.sum(dim=1) / n.clamp(min=1)


def retrieval_metrics(
    query: torch.Tensor,
    query_labels: torch.Tensor | Sequence[int],
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor | Sequence[int],
    *,
    ranks: Sequence[int] = (1, 5),
    map_at: int = 100,
    exclude_self: bool = False,
    full_map: bool = True,
    normalize: bool = True,
    backend: Backend = "auto",
    batch_size: int = 1024,
) -> dict[str, float]:
    """Retrieval quality of ``query`` against ``gallery`` by cosine similarity.

    The gallery is ranked for every query by decreasing similarity, equal similarities by
    increasing gallery index. A gallery item is a positive when it has the query's label.

    - ``rank{r}``: % of queries with a positive among the top r.
    - ``mAP@{map_at}``: mean over queries of the average precision over the positives found in the
      top ``map_at``, normalised by how many were found (0 for a query with none).
    - ``mAP`` (when ``full_map``): mean average precision over the whole ranking, normalised by all
      the query's positives in the gallery (0 for a query whose class is absent from the gallery).

    Rank-r and mAP@k come from a top-k search (exact unless ``backend="faiss_ivf"``) in
    batches of ``batch_size`` queries; the full mAP ranks the whole gallery for blocks of queries
    (torch, about 64 MiB per block). Cut-offs above the gallery size cover the whole gallery.

    Args:
        query: [Q, D] floating tensor.
        query_labels: [Q] integer labels.
        gallery: [G, D] floating tensor.
        gallery_labels: [G] integer labels.
        ranks: the r of Rank-r, each >= 1.
        map_at: the cut-off of mAP@k, >= 1.
        exclude_self: query i is gallery item i (the same set on both sides, Q == G): drop it from
            its own ranking.
        full_map: also compute the full mAP.
        normalize: L2-normalise both sides (cosine similarity).
        backend: search backend of the top-k pass: ``"auto"`` (the faster exact search, see
            [`choose_backend`][cmd.eval.choose_backend]), ``"torch"``, ``"faiss"`` or the
            approximate ``"faiss_ivf"`` (Rank-r and mAP@k then count only the neighbours it finds;
            the full mAP stays exact).
        batch_size: queries per search step.

    Returns:
        {"rank1": %, "rank5": %, "mAP@100": %, "mAP": %} (keys follow ``ranks`` and ``map_at``).

    Example:
        >>> import torch
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> retrieval_metrics(torch.tensor([[1.0, 0.1]]), [1], g, [0, 1], ranks=(1, 2), map_at=2)
        {'rank1': 0.0, 'rank2': 100.0, 'mAP@2': 50.0, 'mAP': 50.0}
    """
    ranks = tuple(ranks)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks must be a non-empty sequence of positive ints, got {ranks!r}")
    if isinstance(map_at, bool) or not isinstance(map_at, int) or map_at < 1:
        raise ValueError(f"map_at must be a positive int, got {map_at!r}")
    check_features(query, "query")
    check_features(gallery, "gallery", query.shape[1], "query")
    q_labels = check_labels(query_labels, "query_labels", query.shape[0], "query")
    g_labels = check_labels(gallery_labels, "gallery_labels", gallery.shape[0], "gallery")
    n_query, n_gallery = query.shape[0], gallery.shape[0]
    if n_query == 0:
        raise ValueError("query is empty")
    if exclude_self and n_query != n_gallery:
        raise ValueError(
            f"exclude_self=True needs query and gallery to be the same set (Q == G), got Q = {n_query}, G = {n_gallery}"
        )
    n_rankable = n_gallery - int(exclude_self)
    if n_rankable < 1:
        raise ValueError(f"the gallery must hold at least one item to rank, got {n_gallery} (exclude_self={exclude_self})")
    q = query.detach().float()
    g = gallery.detach().float()
    if normalize:
        q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)

    depth = min(max(map_at, *ranks), n_rankable)
    search = InnerProductSearch(g, backend=backend, batch_size=batch_size)
    sims, ids = search.search(q, depth + int(exclude_self))
    sims, ids = sims.cpu(), ids.cpu()
    if exclude_self:
        is_self = ids == torch.arange(n_query)[:, None]
        sims = sims.masked_fill(is_self, float("-inf"))  # to the end of the row, then cut
        sims, ids = sort_by_similarity_then_index(sims, ids)
        ids = ids[:, :depth]
    relevant = (g_labels[ids.clamp_min(0)] == q_labels[:, None]) & (ids >= 0)  # [Q, depth]

    out = {f"rank{r}": 100.0 * float(relevant[:, :r].any(dim=1).double().mean()) for r in ranks}
    out[f"mAP@{map_at}"] = 100.0 * float(average_precision(relevant[:, :map_at]).double().mean())
    if full_map:
        out["mAP"] = 100.0 * float(_full_average_precision(q, q_labels, g, g_labels, exclude_self).double().mean())
    return out


def _full_average_precision(
    q: torch.Tensor, q_labels: torch.Tensor, g: torch.Tensor, g_labels: torch.Tensor, exclude_self: bool
) -> torch.Tensor:
    """[Q] AP over the whole gallery ranking, in blocks of queries of bounded size."""
    g_labels = g_labels.to(g.device)
    step = max(1, _FULL_MAP_BLOCK // max(1, g.shape[0]))
    aps = []
    for start in range(0, q.shape[0], step):
        sims = q[start : start + step].to(g.device) @ g.T  # [b, G]
        labels = q_labels[start : start + step].to(g.device)
        relevant_all = g_labels[None, :] == labels[:, None]  # [b, G]
        if exclude_self:
            rows = torch.arange(sims.shape[0], device=g.device)
            sims[rows, rows + start] = float("-inf")
            relevant_all[rows, rows + start] = False
        order = sims.argsort(dim=1, descending=True, stable=True)  # equal sims keep index order
        relevant = relevant_all.gather(1, order)
        aps.append(average_precision(relevant, relevant_all.sum(dim=1)).cpu())
    return torch.cat(aps)


def fine_grained_retrieval_split(
    train_features: torch.Tensor,
    train_labels: torch.Tensor | Sequence[int],
    test_features: torch.Tensor,
    test_labels: torch.Tensor | Sequence[int],
    every: int = 9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query and gallery sets of the fine-grained retrieval protocol.

    Query = every ``every``-th test sample (test index % every == 0); gallery = all training
    samples followed by the remaining test samples, in dataset order.

    Args:
        train_features: [N_train, D]; train_labels: [N_train].
        test_features: [N_test, D]; test_labels: [N_test].
        every: the query stride (9 in the protocol).

    Returns:
        (query [Q, D], query_labels [Q], gallery [N_train + N_test - Q, D], gallery_labels).

    Example:
        >>> import torch
        >>> q, ql, g, gl = fine_grained_retrieval_split(torch.ones(4, 2), [0] * 4, torch.ones(10, 2), list(range(10)))
        >>> ql.tolist(), gl.tolist()
        ([0, 9], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    check_features(train_features, "train_features")
    check_features(test_features, "test_features", train_features.shape[1], "train_features")
    train_y = check_labels(train_labels, "train_labels", train_features.shape[0], "train_features")
    test_y = check_labels(test_labels, "test_labels", test_features.shape[0], "test_features")
    is_query = torch.arange(test_features.shape[0]) % every == 0
    mask = is_query.to(test_features.device)
    query, query_labels = test_features[mask], test_y[is_query]
    gallery = torch.cat([train_features, test_features[~mask].to(train_features.device)])
    gallery_labels = torch.cat([train_y, test_y[~is_query]])
    return query, query_labels, gallery, gallery_labels
