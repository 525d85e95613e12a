"""Label-free signals of representation quality: the effective rank (RankMe) of a set of embeddings.

`rankme` is the effective rank of an ``[n, D]`` embedding matrix (Garrido et al., "RankMe: Assessing
the downstream performance of pretrained self-supervised representations by their rank", ICML 2023):
with ``sigma_1..sigma_r`` its singular values (``r = min(n, D)``) and ``p_k = sigma_k / sum(sigma) + eps``,

    RankMe = exp(-sum_k p_k log p_k)        in [1, min(n, D)] (0 for an all-zero matrix)

A representation that collapsed to one vector has RankMe 1; embeddings spread evenly over D
directions have RankMe near D. `EmbeddingReservoir` keeps a uniform sample (reservoir sampling) of
the rows seen during an epoch, so the training program can report the RankMe of the teacher's
embeddings of the epoch without holding them all; under torch.distributed its `rankme` gathers the
rows of every process first (each keeps ``ceil(capacity / world)``), so every process gets the same
value, that of about ``capacity`` rows of the global stream.

Example:
    >>> import torch
    >>> round(rankme(torch.eye(8)), 4), round(rankme(torch.ones(16, 8)), 4)
    (8.0, 1.0)
    >>> reservoir = EmbeddingReservoir(capacity=64, seed=0)
    >>> for _ in range(10):
    ...     reservoir.add(torch.randn(32, 8))
    >>> reservoir.seen, reservoir.rows().shape
    (320, torch.Size([64, 8]))
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["EmbeddingReservoir", "rankme"]

RANKME_EPS = 1e-7  # Garrido et al.'s epsilon inside the normalised singular values


def rankme(embeddings: torch.Tensor, *, eps: float = RANKME_EPS) -> float:
    """The effective rank (RankMe) of ``embeddings`` [n, D]: ``exp`` of the entropy of its normalised singular values.

    Computed in float64 on the CPU (an SVD of a few thousand rows: milliseconds). The rows are used as
    given (not centred, not normalised), as in the paper.

    Raises:
        ValueError: ``embeddings`` not 2-D, with no row or column, or not finite.

    Example:
        >>> import torch
        >>> round(rankme(torch.diag(torch.tensor([1.0, 1.0, 0.0]))), 3)
        2.0
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or 0 in embeddings.shape:
        shape = list(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"rankme: embeddings must be a tensor [n, D] with n, D >= 1, got {shape}")
    x = embeddings.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("rankme: embeddings hold NaN or infinite values")
    sigma = torch.linalg.svdvals(x)
    total = float(sigma.sum())
    if total == 0.0:
        return 0.0
    p = sigma / total + eps
    return math.exp(float(-(p * p.log()).sum()))


class EmbeddingReservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream of ``[n, D]`` batches (reservoir sampling).

    ``add(rows [n, D])`` updates the sample in place on the rows' device (the random slot choices are
    drawn on the host from ``numpy.random.default_rng(seed)``: no synchronisation with an accelerator);
    ``rows()`` returns this process's sample ``[min(seen, capacity), D]`` (float32); ``rankme()`` the
    RankMe of the sample of every process together (a collective under torch.distributed: call it on
    every process); ``reset(seed)`` empties it for the next epoch.

    Args:
        capacity: rows kept over all processes (each process keeps ``ceil(capacity / world_size)``).
        seed: seeds the slot choices (the program passes its seed and the epoch: reproducible runs).

    Example:
        >>> import torch
        >>> r = EmbeddingReservoir(capacity=4, seed=1)
        >>> r.add(torch.arange(12.0).view(6, 2))
        >>> r.rows().shape, r.seen
        (torch.Size([4, 2]), 6)
    """

    def __init__(self, capacity: int = 2048, *, seed: int = 0) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        from cmd import distributed as dist

        self.capacity = math.ceil(capacity / dist.world_size())
        self.reset(seed)

    def reset(self, seed: int = 0) -> None:
        """Empty the sample; the next slot choices follow ``seed``."""
        self.seen = 0
        self._buffer: torch.Tensor | None = None
        self._rng = np.random.default_rng(seed)

    def add(self, rows: torch.Tensor) -> None:
        """Offer every row of ``rows`` [n, D] to the sample (each of the ``seen`` rows is kept with equal chance)."""
        if not isinstance(rows, torch.Tensor) or rows.dim() != 2:
            raise ValueError(f"EmbeddingReservoir.add: rows must be a tensor [n, D], got "
                             f"{list(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__}")
        rows = rows.detach()
        n = rows.shape[0]
        if self._buffer is None:
            self._buffer = rows.new_empty((self.capacity, rows.shape[1]), dtype=torch.float32)
        elif rows.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"EmbeddingReservoir.add: rows have {rows.shape[1]} columns, the sample has "
                             f"{self._buffer.shape[1]}")
        fill = min(max(self.capacity - self.seen, 0), n)
        if fill:
            self._buffer[self.seen : self.seen + fill] = rows[:fill].float()
        if fill < n:  # Algorithm R: row t (0-based in the stream) replaces slot j ~ U{0..t} when j < capacity
            t = self.seen + np.arange(fill, n)
            slots = np.floor(self._rng.random(n - fill) * (t + 1)).astype(np.int64)
            keep = np.flatnonzero(slots < self.capacity)
            if keep.size:
                # a slot drawn twice in one batch keeps the later row, as one-at-a-time updates would
                slots_rev = slots[keep][::-1]
                _, first = np.unique(slots_rev, return_index=True)
                src = (fill + keep[::-1][first]).tolist()
                dst = slots_rev[first].tolist()
                device = self._buffer.device
                self._buffer[torch.tensor(dst, device=device)] = rows[torch.tensor(src, device=rows.device)].float()
        self.seen += n

    def rows(self) -> torch.Tensor:
        """This process's sample [min(seen, capacity), D] (float32; [0, 0] before any `add`)."""
        if self._buffer is None:
            return torch.empty(0, 0)
        return self._buffer[: min(self.seen, self.capacity)]

    def rankme(self) -> float | None:
        """RankMe of the rows of every process (gathered under torch.distributed); None when no row was seen.

        Under torch.distributed every process calls it, and every process has seen rows (or none has).
        """
        from cmd import distributed as dist

        if self._buffer is None:  # every process or none has seen rows (the program: the same steps on each)
            return None
        rows = self.rows()
        if dist.is_dist() and dist.world_size() > 1:
            rows = dist.all_gather_cat(rows.contiguous())
        return rankme(rows) if rows.shape[0] else None
