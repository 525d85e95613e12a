"""The student's region prototype layer fused with its log-softmax, cross-entropy and bag, in chunks.

The plain region level holds the logits ``x = z P^T`` [T, K] of all T student tokens (``z`` the region
head's L2-normalised bottleneck [T, d], ``P`` its prototypes [K, d]), their float32 log-softmax and
autograd's copies: gigabytes at K = 65536. Here the prototype layer runs inside the loss, one chunk
of crop-images at a time (the technique of Liger-Kernel's fused linear cross-entropy and of Cut
Cross-Entropy, Wijmans et al. 2024, written from the equations below). Per chunk: ``x = z P^T / tau``,
``log q = log_softmax(x)``, the aggregated target ``T_j = sum_{g != v} Q_{g, m_g(j)}`` (the same
``(index, valid)`` as the plain path), ``-sum T log q``, and with weights the bag ``log b =
logsumexp_j(log w_j + log q_j)`` and ``KL(b || p)``. Nothing of size [chunk, K] outlives its chunk;
backward recomputes ``x`` per chunk and forms ``dL/dx`` directly: ``dCE/dx = (m q - T) / tau`` (m = the
token's target mass); ``dKL/dlog q_jk = w_j q_jk a_k`` with ``a_k = log b_k - log p_k + 1``,
``dKL/dw_j = sum_k q_jk a_k``, ``dKL/dlog p_k = -b_k``, through the log-softmax ``(g - q rowsum g) / tau``;
then ``dz = dx P`` and ``dP += dx^T z`` (the chunk's product once more: 2 T d K FLOPs).

Example:
    >>> import torch
    >>> z = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1).requires_grad_()
    >>> protos = torch.randn(16, 8, requires_grad=True)
    >>> teacher_probs = torch.softmax(torch.randn(5, 16), -1)
    >>> index, valid = torch.randint(0, 5, (12, 2)), torch.ones(12, 2)
    >>> ce, kl = fused_prototype_cross_entropy(z, protos, teacher_probs, index, valid, 0.1, chunk_rows=2)
    >>> x = (z.reshape(12, 8) @ protos.T) / 0.1
    >>> target = teacher_probs[index].sum(1)
    >>> bool(torch.allclose(ce, -(target * torch.log_softmax(x, -1)).sum(), rtol=1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_prototype_cross_entropy"]


def _chunk_log_probs(z: torch.Tensor, protos: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(z P^T / tau)`` in float32; the product runs in ``z``'s dtype (bf16 under autocast)."""
    logits = torch.mm(z, protos.to(z.dtype).t())
    return torch.log_softmax(logits.to(torch.float32).div_(temperature), dim=-1)


class _FusedPrototypeCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embedding, protos, teacher_probs, index, valid, weights, image_log_probs, temperature, chunk_rows):  # noqa: D102
        r, n, d = embedding.shape
        flat = embedding.reshape(r * n, d)
        ce = torch.zeros((), device=embedding.device, dtype=torch.float32)
        kl = torch.zeros((), device=embedding.device, dtype=torch.float32)
        log_w = weights.to(torch.float32).log() if weights is not None else None
        log_bags = torch.empty(r, protos.shape[0], device=embedding.device) if weights is not None else None
        for r0 in range(0, r, chunk_rows):
            r1 = min(r, r0 + chunk_rows)
            log_q = _chunk_log_probs(flat[r0 * n : r1 * n], protos, temperature)  # [rows * N, K]
            target = F.embedding_bag(index[r0 * n : r1 * n], teacher_probs, mode="sum",
                                     per_sample_weights=valid[r0 * n : r1 * n])
            ce = ce - torch.dot(target.reshape(-1), log_q.reshape(-1))
            del target
            if log_w is not None:
                # log b = logsumexp_j(log w_j + log q_j); an empty bag (all w = 0): float32 min, finite
                log_b = torch.logsumexp(log_q.view(r1 - r0, n, -1) + log_w[r0:r1].unsqueeze(-1), dim=1)
                log_b.clamp_(min=torch.finfo(torch.float32).min)
                log_bags[r0:r1] = log_b  # [rows, K]: one per bag, small next to the [tokens, K] logits
                kl = kl + (log_b.exp() * (log_b - image_log_probs[r0:r1])).sum()
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.weights_dtype = weights.dtype if weights is not None else None
        ctx.save_for_backward(embedding, protos, teacher_probs, index, valid, log_w, image_log_probs, log_bags)
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):  # noqa: D102
        embedding, protos, teacher_probs, index, valid, log_w, image_log_probs, log_bags = ctx.saved_tensors
        tau, chunk_rows = ctx.temperature, ctx.chunk_rows
        r, n, d = embedding.shape
        flat = embedding.reshape(r * n, d)
        grad_z = torch.empty_like(flat)
        grad_p = torch.zeros(protos.shape, device=protos.device, dtype=torch.float32)
        grad_w = torch.zeros_like(log_w) if log_w is not None else None
        grad_log_p = torch.zeros_like(image_log_probs) if image_log_probs is not None else None
        mass = valid.sum(dim=-1, keepdim=True)  # [T, 1] target mass of each token: G - 1 or G
        gce = grad_ce if grad_ce is not None else torch.zeros((), device=flat.device)
        use_kl = log_w is not None and grad_kl is not None
        for r0 in range(0, r, chunk_rows):
            r1 = min(r, r0 + chunk_rows)
            t0, t1 = r0 * n, r1 * n
            z = flat[t0:t1]
            q = _chunk_log_probs(z, protos, tau).exp_()  # [rows * N, K]
            target = F.embedding_bag(index[t0:t1], teacher_probs, mode="sum", per_sample_weights=valid[t0:t1])
            # dCE/dx * tau = m q - T (the cross-entropy part, already through the log-softmax)
            grad_x = torch.addcmul(-target, q, mass[t0:t1])
            grad_x.mul_(gce)
            del target
            if use_kl:
                rows, k = r1 - r0, q.shape[-1]
                q3 = q.view(rows, n, k)
                log_b = log_bags[r0:r1]
                a = (log_b - image_log_probs[r0:r1]).add_(1.0)  # [rows, K]
                qa = q3 * a.unsqueeze(1)  # q_jk a_k
                grad_w[r0:r1] = grad_kl * qa.sum(dim=-1)
                grad_log_p[r0:r1] = -grad_kl * log_b.exp()
                g_lq = qa.mul_(log_w[r0:r1].exp().unsqueeze(-1)).mul_(grad_kl)  # w_j q_jk a_k
                # through the log-softmax: g - q * rowsum(g)
                g_lq.sub_(q3 * g_lq.sum(dim=-1, keepdim=True))
                grad_x.add_(g_lq.view(rows * n, k))
                del q3, a, qa, g_lq
            grad_x.div_(tau)
            grad_z[t0:t1] = torch.mm(grad_x.to(z.dtype), protos.to(z.dtype)).to(grad_z.dtype)
            if z.dtype == torch.float32:
                grad_p.addmm_(grad_x.t(), z)
            else:  # bf16 / fp16 product, float32 accumulation across chunks
                grad_p.add_(torch.mm(grad_x.t().to(z.dtype), z))
            del q, grad_x
        grad_w = grad_w.to(ctx.weights_dtype) if grad_w is not None else None
        return grad_z.view(r, n, d), grad_p.to(protos.dtype), None, None, None, grad_w, grad_log_p, None, None


def fused_prototype_cross_entropy(
    embedding: torch.Tensor,
    prototypes: torch.Tensor,
    teacher_probs: torch.Tensor,
    target_index: torch.Tensor,
    target_valid: torch.Tensor,
    temperature: float,
    *,
    weights: torch.Tensor | None = None,
    image_log_probs: torch.Tensor | None = None,
    chunk_rows: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ce = -sum_tk T_tk log q_tk`` and ``kl = sum_r KL(b_r || p_r)`` with ``log q = log_softmax(z P^T / tau)``
    applied chunk by chunk, never holding the [R * N, K] logits (``T_t = sum_g valid_tg Q[index_tg]``).

    Shapes: ``embedding`` [R, N, d] (``region_embedding``: R crop-images, each a bag of N tokens);
    ``prototypes`` [K, d]; ``teacher_probs`` [M, K] float32 (no gradient); ``target_index`` /
    ``target_valid`` [R * N, G] (`cmd.losses.functional.target_index`); ``weights`` [R, N] normalised,
    or None (no bag term); ``image_log_probs`` [R, K] (with ``weights``). ``chunk_rows`` crop-images
    per chunk (peak extra memory: a few ``chunk_rows * N * K`` float32). Returns ``(ce, kl)``, 0-dim
    float32 sums; gradients reach ``embedding``, ``prototypes``, ``weights`` and ``image_log_probs``.
    """
    d = embedding.shape[-1]
    if embedding.dim() != 3 or prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"embedding must be [R, N, d] and prototypes [K, d]; got {list(embedding.shape)}, "
                         f"{list(prototypes.shape)}")
    if (weights is None) != (image_log_probs is None):
        raise ValueError("weights and image_log_probs go together (the bag term needs both)")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    return _FusedPrototypeCrossEntropy.apply(
        embedding, prototypes, teacher_probs.detach(), target_index, target_valid.to(torch.float32),
        weights, image_log_probs, float(temperature), chunk_rows,
    )
