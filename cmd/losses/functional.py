"""Stateless numerical blocks of the distillation losses, all computed in float32.

- `soft_cross_entropy`: the summed cross-entropy ``sum_r H(T_r, softmax(x_r / tau))`` of rows of logits
  against (aggregated) soft targets, fused with its own backward so that no [rows, K] product is
  materialised and the gradient is formed in place.
- `mixture_log_prob`: ``log b = logsumexp_j(log w_j + log q_j)``, the log of a multi-instance bag (a
  mixture of the instances' distributions), finite and with finite gradients when some weights are 0.
- `kl_divergence_rows`: ``KL(b || p)`` row by row from log-probabilities.
- `match_regions`: the argmax-cosine matching of student to teacher region tokens of the same image.

Example:
    >>> import torch
    >>> x = torch.randn(3, 5, requires_grad=True)
    >>> target = torch.softmax(torch.randn(3, 5), -1)
    >>> ce, _ = soft_cross_entropy(x, target, 0.1, [(3, 1.0)])
    >>> ref = -(target * torch.log_softmax(x / 0.1, -1)).sum()
    >>> bool(torch.allclose(ce, ref))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "no_autocast",
    "scaled_float32",
    "soft_cross_entropy",
    "mixture_log_prob",
    "kl_divergence_rows",
    "match_regions",
    "teacher_match_tokens",
]

# exp() of anything below this underflows to a sub-normal float32 (or 0).
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
_FLOAT32_MIN = torch.finfo(torch.float32).min
# exp(80) ~ 5.5e34 stays finite in float32; used to bound d log b / d w_j where w_j == 0.
_MAX_EXPONENT = 80.0


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast on ``device``'s type (the losses control their precision themselves)."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # pragma: no cover - a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def scaled_float32(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``x / temperature`` as a new float32 tensor (one copy whatever the input dtype)."""
    if x.dtype == torch.float32:
        return x / temperature
    return x.to(torch.float32).div_(temperature)


def flush_subnormal_(probs: torch.Tensor) -> torch.Tensor:
    """Set probabilities below float32's smallest normal number (1.2e-38) to 0, in place.

    The mass removed is below float32's resolution of any sum; on CPUs every later operation on
    sub-normal numbers is tens of times slower (a sharp teacher at temperature 0.04 produces many).
    """
    return F.threshold_(probs, _FLOAT32_TINY, 0.0)


class _SoftCrossEntropy(torch.autograd.Function):
    """Forward: ``(sum_rk -T_rk log_softmax(x / tau)_rk, log_softmax(x / tau) or None)``.

    Backward (``m_r = sum_k T_rk``, the target mass of row r, given per row range):
    ``d/dx = [g (m softmax - T) + G_L - softmax rowsum(G_L)] / tau``, formed in place.
    """

    @staticmethod
    def forward(ctx, logits, target, temperature, mass_segments, return_log_probs):  # noqa: D102
        ctx.set_materialize_grads(False)
        z = scaled_float32(logits, temperature)
        log_probs = torch.log_softmax(z, dim=-1)
        del z
        ce = -torch.dot(target.reshape(-1), log_probs.reshape(-1))
        ctx.temperature = temperature
        ctx.mass_segments = tuple(mass_segments)
        ctx.input_dtype = logits.dtype
        ctx.return_log_probs = return_log_probs
        ctx.save_for_backward(log_probs, target)
        return (ce, log_probs) if return_log_probs else ce

    @staticmethod
    def backward(ctx, grad_ce, grad_log_probs=None):  # noqa: D102
        log_probs, target = ctx.saved_tensors
        if grad_ce is None and grad_log_probs is None:
            return None, None, None, None, None
        # softmax = exp(log_probs); an internal log_probs (not an output) is consumed in place
        # (a second backward through the same graph then fails autograd's version check).
        probs = torch.exp(log_probs) if ctx.return_log_probs else log_probs.exp_()
        if grad_log_probs is None:
            # grad = g / tau * (m * softmax - T) = (g m / tau) * (softmax - T / m), two in-place passes.
            start = 0
            for rows, mass in ctx.mass_segments:
                part = probs[start : start + rows]
                if mass == 0.0:  # an empty bag (a single teacher crop and the student's own view)
                    part.zero_()
                else:
                    part.sub_(target[start : start + rows], alpha=1.0 / mass).mul_(grad_ce * (mass / ctx.temperature))
                start += rows
        else:
            # grad = [G_L - softmax * rowsum(G_L) + g (m * softmax - T)] / tau
            coef = -grad_log_probs.sum(dim=-1, keepdim=True)
            if grad_ce is not None:
                start = 0
                for rows, mass in ctx.mass_segments:
                    coef[start : start + rows].add_(grad_ce * mass)
                    start += rows
            inv_tau = 1.0 / ctx.temperature
            probs.mul_(coef.mul_(inv_tau)).add_(grad_log_probs, alpha=inv_tau)
            if grad_ce is not None:
                probs.addcmul_(target, grad_ce, value=-inv_tau)
        return probs.to(ctx.input_dtype), None, None, None, None


def soft_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    target_mass: Sequence[tuple[int, float]],
    *,
    return_log_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of rows of logits against soft targets, in float32.

    ``ce = sum_r H(T_r, softmax(x_r / tau)) = -sum_r sum_k T_rk log_softmax(x_r / tau)_k``.

    The targets may be sums of several distributions (the aggregated targets of the distillation
    losses: the cross-entropy is linear in its target); ``target_mass`` gives each row's target mass
    ``sum_k T_rk`` as consecutive row ranges ``(rows, mass)``, used by the backward pass.

    Args:
        logits: [R, K] student logits, any floating dtype (the gradient comes back in that dtype).
        target: [R, K] float32 targets, no gradient.
        temperature: tau > 0.
        target_mass: ``[(rows, mass), ...]`` covering the R rows in order.
        return_log_probs: also return ``log_softmax(x / tau)`` [R, K] as a differentiable output
            (for the multi-instance bags); else None and its memory is reused by the backward pass.

    Returns:
        ``(ce, log_probs)``: ``ce`` a 0-dim float32 tensor.

    Example:
        >>> x = torch.zeros(2, 4)
        >>> ce, _ = soft_cross_entropy(x, torch.full((2, 4), 0.25), 1.0, [(2, 1.0)])
        >>> round(float(ce), 4)  # 2 rows x log(4)
        2.7726
    """
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(
            f"logits and target must both have shape [R, K]; got {list(logits.shape)} and {list(target.shape)}"
        )
    if sum(rows for rows, _ in target_mass) != logits.shape[0]:
        raise ValueError(f"target_mass {list(target_mass)} does not cover the {logits.shape[0]} rows")
    if target.dtype != torch.float32:
        raise TypeError(f"target must be float32; got {target.dtype}")
    if return_log_probs:
        return _SoftCrossEntropy.apply(logits, target, float(temperature), target_mass, True)
    return _SoftCrossEntropy.apply(logits, target, float(temperature), target_mass, False), None


class _MixtureLogProb(torch.autograd.Function):
    """``log b_k = logsumexp_j(log w_j + log q_jk)`` over the instances j of each bag."""

    @staticmethod
    def forward(ctx, log_probs, weights):  # noqa: D102
        w = weights.to(torch.float32)
        log_w = w.log()  # log 0 = -inf: that instance does not contribute
        a = log_probs + log_w.unsqueeze(-1)  # [R, N, K]
        peak = a.amax(dim=1)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        a.sub_(peak.unsqueeze(1)).exp_()
        log_b = a.sum(dim=1).log_().add_(peak)
        del a
        # A bag whose weights are all 0 is empty: log b = float32 min (b = 0) keeps every later step finite.
        log_b.clamp_(min=_FLOAT32_MIN)
        ctx.weights_dtype = weights.dtype
        ctx.save_for_backward(log_probs, log_w, log_b)
        return log_b

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        log_probs, log_w, log_b = ctx.saved_tensors
        grad = grad.to(torch.float32)
        # e_jk = g_k q_jk / b_k from log(q_jk / b_k), with one exp over [R, N, K]. Where w_j > 0,
        # q_jk / b_k <= 1 / w_j; where w_j == 0 it is bounded by exp(80) to stay finite.
        e = torch.sub(log_probs, log_b.unsqueeze(1)).clamp_(max=_MAX_EXPONENT).exp_().mul_(grad.unsqueeze(1))
        # d log b_k / d w_j = q_jk / b_k, also where w_j == 0.
        grad_w = e.sum(dim=-1)
        # d log b_k / d log q_jk = w_j q_jk / b_k, the responsibility of instance j: in [0, 1].
        grad_log_probs = e.mul_(log_w.exp().unsqueeze(-1))
        return grad_log_probs, grad_w.to(ctx.weights_dtype)


def mixture_log_prob(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of multi-instance bags: ``log b = logsumexp_j(log w_j + log q_j)``.

    ``b = sum_j w_j q_j`` is a mixture of the instance distributions ``q_j``, computed in log space
    so that it stays finite when every ``q_jk`` underflows. Weights that are exactly 0 get
    ``log w = -inf`` and drop out; the gradient with respect to them is still the finite
    ``sum_k g_k q_jk / b_k``. A bag whose weights are all 0 has ``b = 0`` (log b = float32 min).

    Args:
        log_probs: [R, N, K] float32 instance log-probabilities ``log q``.
        weights: [R, N] instance weights, >= 0, rows summing to 1.

    Returns:
        [R, K] float32 ``log b``.

    Example:
        >>> q = torch.log_softmax(torch.randn(2, 3, 4), -1)
        >>> w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
        >>> ref = torch.log((w.unsqueeze(-1) * q.exp()).sum(1))
        >>> bool(torch.allclose(mixture_log_prob(q, w), ref, atol=1e-6))
        True
    """
    if log_probs.dim() != 3 or weights.shape != log_probs.shape[:2]:
        raise ValueError(
            f"log_probs must be [R, N, K] and weights [R, N]; got {list(log_probs.shape)} and {list(weights.shape)}"
        )
    return _MixtureLogProb.apply(log_probs, weights)


def kl_divergence_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_k p_k (log p_k - log q_k)`` for each row, from log-probabilities.

    Args:
        log_p, log_q: [R, K] log-probabilities (finite).

    Returns:
        [R] float32.

    Example:
        >>> lp = torch.log_softmax(torch.randn(2, 5), -1)
        >>> kl_divergence_rows(lp, lp).abs().max() < 1e-6
        tensor(True)
    """
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def teacher_match_tokens(features: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised teacher tokens [G * B, N, D] regrouped per image: [B, G * N, D] float32, no gradient."""
    g, n, d = features.shape[0] // batch_size, features.shape[1], features.shape[2]
    with torch.no_grad():
        unit = F.normalize(features.detach().to(torch.float32), dim=-1)
        return unit.view(g, batch_size, n, d).transpose(0, 1).reshape(batch_size, g * n, d)


def match_regions(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    batch_size: int,
    *,
    teacher_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """For every student region, the most similar region of every teacher crop of the same image.

    ``m_g(j) = argmax_i cos(F_v,j, F'_g,i)`` on backbone tokens, with no gradient. The student token's
    norm does not change the argmax over i, so only the teacher tokens are normalised; one batched
    matrix product per image covers all student and teacher crops.

    Args:
        student_features: [C * B, N_s, D] tokens of C student crops (crop-major).
        teacher_features: [G * B, N_t, D] tokens of G teacher crops (crop-major).
        batch_size: B.
        teacher_tokens: ``teacher_match_tokens(teacher_features, B)`` when already computed.

    Returns:
        [C, B, N_s, G] long: index in ``[0, N_t)`` of the matched teacher token.

    Example:
        >>> s, t = torch.randn(2 * 3, 4, 8), torch.randn(1 * 3, 5, 8)
        >>> match_regions(s, t, 3).shape
        torch.Size([2, 3, 4, 1])
    """
    b = batch_size
    c, n_s, d = student_features.shape[0] // b, student_features.shape[1], student_features.shape[2]
    g, n_t = teacher_features.shape[0] // b, teacher_features.shape[1]
    with torch.no_grad():
        t = teacher_tokens if teacher_tokens is not None else teacher_match_tokens(teacher_features, b)
        s = student_features.detach().to(torch.float32).view(c, b, n_s, d).transpose(0, 1).reshape(b, c * n_s, d)
        sim = torch.bmm(s, t.transpose(1, 2))  # [B, C*N_s, G*N_t]
        return sim.view(b, c, n_s, g, n_t).argmax(dim=-1).permute(1, 0, 2, 3)
