"""Stateless float32 blocks of the distillation losses, in plain autograd.

- `target_index`: the one representation of the aggregated targets ``T_r = sum_{g != v} P_{index[r, g]}``
  as ``(index [R, G], valid [R, G])``, used by the image level, the region level and the fused path;
  `aggregate_targets` sums the rows it names in one ``embedding_bag`` call.
- `match_regions`: the argmax-cosine matching of student to teacher region tokens of the same image.
- `bag_log_prob`: ``log b = logsumexp_j(log w_j + log q_j)``, a multi-instance bag (a mixture).
- `kl_rows`, `koleo`: ``KL(p || q)`` per row; DINOv2's KoLeo regulariser.

Example:
    >>> import torch
    >>> index, valid = target_index(torch.zeros(3, 2, 1, 2, dtype=torch.long), 0, 2, 1)  # V=3, B=2, G=2
    >>> index.tolist()[:2], valid.tolist()[:3]
    ([[0, 2], [1, 3]], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["target_index", "aggregate_targets", "match_regions", "unit_teacher_tokens", "normalise_weights", "bag_log_prob", "kl_rows", "koleo"]

_TINY = torch.finfo(torch.float32).tiny


def target_index(matches: torch.Tensor, first_crop: int, batch_size: int, teacher_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher rows that make each student row's aggregated target, and which of them count.

    Teacher rows are crop-major, ``(g * B + b) * N_t + i`` for token i of image b in teacher crop g.

    Args:
        matches: [C, B, N, G] long, the matched teacher token ``m_g(j)`` of every student token j of C
            crops (zeros with N = N_t = 1 for the image level).
        first_crop: the index among all V student crops of the first of these C crops.
        batch_size: B. teacher_tokens: N_t.

    Returns:
        ``(index [C * B * N, G] long, valid [C * B * N, G] float32)``: the target of student row
        ``(c * B + b) * N + j`` is ``sum_g valid * P[index]``; ``valid`` is 0 exactly where g is the
        student crop's own view (v = first_crop + c).
    """
    c, b, _, g = matches.shape
    dev = matches.device
    image = torch.arange(b, device=dev).view(1, b, 1, 1)
    teacher = torch.arange(g, device=dev).view(1, 1, 1, g)
    index = (teacher * batch_size + image) * teacher_tokens + matches
    crop = torch.arange(first_crop, first_crop + c, device=dev).view(c, 1, 1, 1)
    valid = (crop != teacher).to(torch.float32).expand(matches.shape)
    return index.reshape(-1, g), valid.reshape(-1, g)


@torch.no_grad()
def aggregate_targets(probs: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``T_r = sum_g valid[r, g] probs[index[r, g]]`` [R, K] float32 from ``probs`` [M, K] (no gradient)."""
    return F.embedding_bag(index, probs, mode="sum", per_sample_weights=valid)


@torch.no_grad()
def unit_teacher_tokens(teacher_tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher side of `match_regions`: [G * B, N_t, D] crop-major -> unit rows [B, G * N_t, D] float32 (image-major).

    Compute it once per step and pass it to every `match_regions` call as ``teacher_unit``.
    """
    b = batch_size
    g, n_t, d = teacher_tokens.shape[0] // b, teacher_tokens.shape[1], teacher_tokens.shape[2]
    return F.normalize(teacher_tokens.float(), dim=-1).view(g, b, n_t, d).transpose(0, 1).reshape(b, g * n_t, d)


@torch.no_grad()
def match_regions(
    student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, batch_size: int, *, teacher_unit: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every student region, the most similar region of every teacher crop of the same image.

    ``m_g(j) = argmax_i cos(F_v,j, F'_g,i)`` on backbone tokens, no gradient. The student token's norm
    does not change the argmax over i, so only the teacher tokens are normalised.

    ``student_tokens`` [C * B, N_s, D] and ``teacher_tokens`` [G * B, N_t, D] (crop-major) give
    ``(matches [C, B, N_s, G] long, finite)`` (``teacher_unit``: `unit_teacher_tokens` of ``teacher_tokens``,
    computed once for several student groups): ``finite`` a 0-dim bool, False when a similarity is not
    finite (NaN / inf tokens), for the caller to make its term NaN rather than silently finite.

    Example:
        >>> m, ok = match_regions(torch.randn(2 * 3, 4, 8), torch.randn(1 * 3, 5, 8), 3)
        >>> m.shape, bool(ok)
        (torch.Size([2, 3, 4, 1]), True)
    """
    b = batch_size
    c, n_s, d = student_tokens.shape[0] // b, student_tokens.shape[1], student_tokens.shape[2]
    g, n_t = teacher_tokens.shape[0] // b, teacher_tokens.shape[1]
    t = unit_teacher_tokens(teacher_tokens, b) if teacher_unit is None else teacher_unit
    s = student_tokens.float().view(c, b, n_s, d).transpose(0, 1).reshape(b, c * n_s, d)
    sim = torch.bmm(s, t.transpose(1, 2))  # [B, C * N_s, G * N_t]
    return sim.view(b, c, n_s, g, n_t).argmax(dim=-1).permute(1, 0, 2, 3), torch.isfinite(sim).all()


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """``w / sum_j w_j`` in float32 [R, N] (differentiable).

    Makes the bags proper mixtures also for low-precision weights (a bf16 softmax sums to 1 only
    within ~1e-3), so the KL terms stay >= 0; the gradient is then the projection
    ``g_j - sum_i w_i g_i`` of the formula's gradient, which changes nothing downstream of a softmax.
    """
    w = weights.float()
    return w / w.sum(dim=-1, keepdim=True).clamp_min(_TINY)


def bag_log_prob(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log b = logsumexp_j(log w_j + log q_j)`` [R, K] from ``log q`` [R, N, K] and ``w`` [R, N].

    ``b = sum_j w_j q_j`` is a mixture of the instance distributions, computed in log space, finite
    when every ``q_jk`` underflows. A weight of exactly 0 counts as float32's smallest normal number
    (its contribution is below float32's resolution of b) and gets gradient 0: the one-sided
    derivative ``q_j / b`` there can exceed float32's range, and a softmax pooling's logits get
    ``w_j (...) = 0`` there anyway.

    Example:
        >>> q = torch.log_softmax(torch.randn(2, 3, 4), -1)
        >>> w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
        >>> torch.allclose(bag_log_prob(q, w), torch.log((w.unsqueeze(-1) * q.exp()).sum(1)), atol=1e-6)
        True
    """
    return torch.logsumexp(log_probs + weights.clamp_min(_TINY).log().unsqueeze(-1), dim=1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` [R] from finite log-probabilities [R, K]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def koleo(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser: ``-mean_i log(min_{j != i} ||x_i - x_j||_2 + eps)`` of unit vectors.

    ``embeddings`` [R >= 2, D] are L2-normalised (float32); the nearest neighbour is found without
    gradient and the distance recomputed as ``sqrt(||x_i - x_nn||^2 + tiny)``, so duplicates give the
    finite ``-log(eps)`` with a finite gradient. Returns a 0-dim float32; minimising it spreads the batch.

    Example:
        >>> x = torch.eye(3)
        >>> round(float(koleo(x)), 4)  # every nearest neighbour at distance sqrt(2)
        -0.3466
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"koleo needs embeddings [R >= 2, D]; got {list(embeddings.shape)}")
    x = F.normalize(embeddings.float(), dim=-1, eps=1e-8)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-float("inf"))
        nearest = sim.argmax(dim=1)
    distance = ((x - x[nearest]).square().sum(dim=-1) + _TINY).sqrt()
    return -torch.log(distance + eps).mean()
