"""Exact top-k inner-product search, with faiss or with a chunked matrix product in torch.

Both k-NN classification and retrieval rank a database by the inner product with each query
(cosine similarity once the rows are L2-normalised). :class:`InnerProductSearch` does that exactly
and with bounded memory: the queries are processed ``batch_size`` at a time, and the torch backend
also walks the database in chunks of ``database_chunk`` rows, merging the running top-k, so no full
queries x database matrix is ever materialised (a 1,000,000 x 768 database is fine).

Results are ordered by decreasing similarity; equal similarities are ordered by increasing database
index, so rankings are deterministic.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

__all__ = ["InnerProductSearch", "check_features", "sort_by_similarity_then_index"]

Backend = Literal["faiss", "torch"]


def check_features(
    x: torch.Tensor, name: str, dim: int | None = None, dim_of: str = "the reference features"
) -> torch.Tensor:
    """Check that ``x`` is a finite 2-D floating tensor [N, D] (with D == ``dim``, that of ``dim_of``).

    Raises:
        TypeError: when ``x`` is not a floating-point tensor.
        ValueError: for a wrong number of dimensions, a wrong D, or NaN / inf entries.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, D], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D], got {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} must have D = {dim} columns (as {dim_of}), got {x.shape[1]}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first at row {row})")
    return x


def sort_by_similarity_then_index(sims: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row of (``sims`` [Q, k], ``ids`` [Q, k]) by decreasing sim, ties by increasing id."""
    by_id = ids.argsort(dim=1, stable=True)
    sims, ids = sims.gather(1, by_id), ids.gather(1, by_id)
    sims, by_sim = sims.sort(dim=1, descending=True, stable=True)
    return sims, ids.gather(1, by_sim)


class InnerProductSearch:
    """Exact maximum-inner-product search over a fixed database.

    Args:
        database: [M, D] floating tensor (L2-normalise the rows beforehand for cosine similarity).
        backend: ``"faiss"`` (``faiss.IndexFlatIP``, on the CPU; the database is copied into the
            index) or ``"torch"`` (chunked matrix products on the database's device).
        batch_size: queries per search step (bounds the memory of one step).
        database_chunk: database rows per matrix product (torch backend only).

    Example:
        >>> import torch
        >>> db = torch.eye(3)
        >>> sims, ids = InnerProductSearch(db, backend="torch").search(torch.tensor([[0.0, 1.0, 0.5]]), k=2)
        >>> ids.tolist()
        [[1, 2]]
    """

    def __init__(
        self,
        database: torch.Tensor,
        *,
        backend: Backend = "faiss",
        batch_size: int = 1024,
        database_chunk: int = 32768,
    ) -> None:
        if backend not in ("faiss", "torch"):
            raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(database_chunk, int) or database_chunk < 1:
            raise ValueError(f"database_chunk must be a positive int, got {database_chunk!r}")
        check_features(database, "database")
        self.backend: Backend = backend
        self.batch_size = batch_size
        self.database_chunk = database_chunk
        self.size, self.dim = int(database.shape[0]), int(database.shape[1])
        if backend == "faiss":
            import faiss

            self._index = faiss.IndexFlatIP(self.dim)
            self._index.add(_as_faiss_array(database))
            self._database = None
        else:
            self._index = None
            self._database = database.detach().float().contiguous()

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` most similar database rows of every query.

        Args:
            queries: [Q, D] floating tensor.
            k: number of neighbours, 1 <= k <= database size.

        Returns:
            (sims [Q, k] float32, ids [Q, k] int64), on the CPU for faiss and on the database's
            device for torch; rows sorted by decreasing similarity, ties by increasing id.
        """
        check_features(queries, "queries", self.dim, "the database")
        if not 1 <= k <= self.size:
            raise ValueError(f"k must lie in [1, {self.size}] (the database size), got {k}")
        sims, ids = [], []
        for start in range(0, queries.shape[0], self.batch_size):
            chunk = queries[start : start + self.batch_size]
            if self.backend == "faiss":
                s, i = self._index.search(_as_faiss_array(chunk), k)
                s, i = torch.from_numpy(s), torch.from_numpy(i).long()
            else:
                s, i = self._search_torch(chunk, k)
            sims.append(s)
            ids.append(i)
        if not sims:
            device = torch.device("cpu") if self._database is None else self._database.device
            return torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.long, device=device)
        return sort_by_similarity_then_index(torch.cat(sims), torch.cat(ids))

    def _search_torch(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        db = self._database
        q = queries.to(device=db.device, dtype=torch.float32)
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=db.device)
        for start in range(0, self.size, self.database_chunk):
            block = q @ db[start : start + self.database_chunk].T  # [q, chunk]
            s, i = block.topk(min(k, block.shape[1]), dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + start], dim=1)
            if best_s.shape[1] > k:
                best_s, keep = best_s.topk(k, dim=1)
                best_i = best_i.gather(1, keep)
        return best_s, best_i


def _as_faiss_array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to(device="cpu", dtype=torch.float32).numpy())
