"""The region level's cross-entropy and multi-instance bag term in chunks, with the gradient formed in the forward pass.

Plain autograd holds, for all T student tokens, the scaled logits, their float32 log-softmax, the
aggregated targets and autograd's copies, each [T, K]: at K = 4096 tens of megabytes that no CPU
cache holds, at K = 65536 gigabytes, and it takes an exponential per token and class twice (the
log-softmax and its backward). Here the region terms run one chunk of crop-images at a time. Each
chunk takes one exponential per element (a softmax) and forms ``dL/dx`` at once:
the two outputs' weights (``ce_weight``, ``kl_weight``) are known in the forward pass, so backward
only scales the stored gradients by the incoming scalar (the technique of Liger-Kernel's fused linear
cross-entropy, written from the equations below). Two sources of logits:

- `region_cross_entropy`: the region logits ``x`` [R, N, K] are given (the head's output); the stored
  gradient is [R, N, K], the size of the logits;
- `fused_prototype_cross_entropy`: the student's prototype layer runs inside, ``x = z P^T`` per chunk
  (``z`` the region head's L2-normalised bottleneck [R, N, d], ``P`` its prototypes [K, d]): the
  [T, K] logits never exist, and the stored gradients are ``dz = dx P`` [R, N, d] and ``dP = dx^T z`` [K, d].

Per chunk (``s = x / tau``): ``q = softmax(s)``; the aggregated target ``T_j = sum_{g != v} Q_{g, m_g(j)}``
(`cmd.losses.functional.target_index`); ``ce -= sum T log q`` with ``log q = (s - max s) + log max q``, two
sums of one sign (``-T.(s - max s)`` and ``-m log max q``, ``max q >= 1/K``), so no ``log q`` is formed;
with weights the bag ``b = sum_j w_j q_j`` and ``kl += KL(b || p)``. Gradients: ``dCE/dx = (m q - T) / tau``
(m = the token's target mass); with ``a_k = log b_k - log p_k + 1`` and ``c_j = sum_k q_jk a_k``:
``dKL/dw_j = c_j``, ``dKL/dlog p_k = -b_k``, ``dKL/dx_jk = w_j q_jk (a_k - c_j) / tau``. ``log b`` is
clamped at float32's smallest normal number: a class whose bag probability underflows adds below
float32's resolution to the KL and gets a finite gradient.

Example:
    >>> import torch
    >>> z = torch.nn.functional.normalize(torch.randn(4, 3, 8), dim=-1).requires_grad_()
    >>> protos = torch.randn(16, 8, requires_grad=True)
    >>> teacher_probs = torch.softmax(torch.randn(5, 16), -1)
    >>> index, valid = torch.randint(0, 5, (12, 2)), torch.ones(12, 2)
    >>> out = fused_prototype_cross_entropy(z, protos, teacher_probs, index, valid, 0.1, chunk_rows=2)
    >>> x = (z.reshape(12, 8) @ protos.T) / 0.1
    >>> target = teacher_probs[index].sum(1)
    >>> bool(torch.allclose(out.cross_entropy, -(target * torch.log_softmax(x, -1)).sum(), rtol=1e-5))
    True
    >>> out.loss.backward()  # d(ce)/dz and d(ce)/dP, formed in the forward pass
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["RegionTerms", "region_cross_entropy", "fused_prototype_cross_entropy", "auto_chunk_rows"]

_TINY = torch.finfo(torch.float32).tiny
# Elements of one chunk's [rows * N, K] float32 buffers: on a CPU the few of them stay in the last-level
# cache (4 MiB each; measured best of 2^16-2^24 at K = 4096, 2 threads); on a GPU large chunks keep the kernel launches few.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_DEFAULT = 1 << 26


class RegionTerms(NamedTuple):
    """``loss = ce_weight * cross_entropy + kl_weight * kl`` (differentiable) and the two sums (0-dim, no gradient)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    kl: torch.Tensor


def auto_chunk_rows(tokens: int, out_dim: int, device: torch.device) -> int:
    """Crop-images per chunk for bags of ``tokens`` tokens over ``out_dim`` prototypes on ``device``.

    Example:
        >>> auto_chunk_rows(49, 4096, torch.device("cpu")), auto_chunk_rows(9, 4096, torch.device("cpu"))
        (5, 28)
    """
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_DEFAULT)
    return max(1, budget // max(1, tokens * out_dim))


def _shifted_logits(source: torch.Tensor, protos: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """``s - max s`` with ``s = x / tau`` [t, K], a new float32 tensor; ``x = source`` or ``source P^T`` (the product
    in ``source``'s dtype). One pass beside the maximum: ``x / tau + (-max x / tau)``, exactly 0 at the maximum."""
    x = source if protos is None else torch.mm(source, protos.to(source.dtype).t())
    x = x.float()
    inv_tau = 1.0 / temperature
    return torch.add(x.amax(dim=-1, keepdim=True).mul_(-inv_tau), x, alpha=inv_tau)


class _ChunkedRegionTerms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, source, protos, teacher_probs, index, valid, weights, image_log_probs,  # noqa: D102
                temperature, ce_weight, kl_weight, chunk_rows):
        r, n = source.shape[:2]
        flat = source.reshape(r * n, -1)
        dev, inv_tau = source.device, 1.0 / temperature
        need_source, need_protos, _, _, _, need_w, need_lp = ctx.needs_input_grad[:7]
        grad = any((need_source, need_protos, need_w, need_lp))
        ce = torch.zeros((), device=dev, dtype=torch.float32)
        kl = torch.zeros((), device=dev, dtype=torch.float32)
        w_all = weights.to(torch.float32) if weights is not None else None
        grad_source = torch.empty_like(flat) if need_source else None
        grad_p = torch.zeros(protos.shape, device=dev, dtype=torch.float32) if need_protos else None
        grad_w = torch.empty(r, n, device=dev, dtype=torch.float32) if need_w else None
        grad_lp = torch.empty(r, teacher_probs.shape[-1], device=dev, dtype=torch.float32) if need_lp else None
        mass = valid.sum(dim=-1, keepdim=True)  # [T, 1] target mass of each token: G - 1 or G
        # the gathered target comes scaled, -sigma T, so that the gradient is one addcmul (sigma = 1 without a CE weight)
        ce_scale = ce_weight * inv_tau
        sigma = ce_scale if ce_scale != 0 else 1.0
        neg_valid = valid * -sigma
        for r0 in range(0, r, chunk_rows):
            r1 = min(r, r0 + chunk_rows)
            rows, t0, t1 = r1 - r0, r0 * n, r1 * n
            shifted = _shifted_logits(flat[t0:t1], protos, temperature)  # s - max s <= 0 [rows * N, K]
            q = torch.softmax(shifted, dim=-1)  # the chunk's one exponential (softmax's is the fast one)
            target = F.embedding_bag(index[t0:t1], teacher_probs, mode="sum", per_sample_weights=neg_valid[t0:t1])
            # log q = (s - max s) + log max q, so -sum T log q = -T.(s - max s) - m log max q: two sums >= 0
            ce.add_(torch.dot(target.view(-1), shifted.view(-1)), alpha=1.0 / sigma)  # target = -sigma T
            ce.sub_(torch.dot(mass[t0:t1].view(-1), q.amax(dim=-1).log_()))
            del shifted
            k = q.shape[-1]
            q3 = q.view(rows, n, k)
            if w_all is not None:
                w = w_all[r0:r1]
                b = torch.bmm(w.unsqueeze(1), q3).squeeze(1)  # [rows, K] the bags
                a = b.clamp_min(_TINY).log_().sub_(image_log_probs[r0:r1])  # log b - log p
                kl.add_(torch.dot(b.view(-1), a.view(-1)))
                if grad:
                    a.add_(1.0)
                    c = torch.bmm(q3, a.unsqueeze(-1)).squeeze(-1)  # [rows, N] c_j = sum_k q_jk a_k = dKL/dw_j
                    if need_w:
                        grad_w[r0:r1] = c
                    if need_lp:
                        grad_lp[r0:r1] = b.neg_()
            if not (need_source or need_protos):  # only the small gradients of w and log p are wanted
                continue
            # dL/dx = ce_weight (m q - T) / tau [+ kl_weight w_j q_jk (a_k - c_j) / tau] = -sigma T + q coef, one
            # addcmul, written straight into the stored gradient where it is float32 logits' (no copy)
            direct = protos is None and grad_source.dtype == torch.float32
            g_x = grad_source[t0:t1] if direct else torch.empty_like(q)
            if ce_scale == 0:
                target.zero_()
            if w_all is not None and kl_weight:
                coef = (a.unsqueeze(1) - c.unsqueeze(-1)).mul_((w * (kl_weight * inv_tau)).unsqueeze(-1))
                coef.add_(mass[t0:t1].view(rows, n, 1) * ce_scale)
                torch.addcmul(target.view(rows, n, k), q3, coef, out=g_x.view(rows, n, k))
            else:
                torch.addcmul(target, q, mass[t0:t1] * ce_scale, out=g_x)
            del target, q, q3
            if protos is None:
                if not direct:
                    grad_source[t0:t1] = g_x
                continue
            x = flat[t0:t1]
            if need_source:
                grad_source[t0:t1] = torch.mm(g_x.to(x.dtype), protos.to(x.dtype))
            if need_protos:
                if x.dtype == torch.float32:
                    grad_p.addmm_(g_x.t(), x)
                else:  # bf16 / fp16 product, float32 accumulation across chunks
                    grad_p.add_(torch.mm(g_x.t().to(x.dtype), x))
        if grad_w is not None:
            grad_w.mul_(kl_weight)
        if grad_lp is not None:
            grad_lp.mul_(kl_weight)
        loss = ce * ce_weight + kl * kl_weight
        ctx.grads = (grad_source, grad_p, grad_w, grad_lp)
        ctx.dtypes = (source.dtype, protos.dtype if protos is not None else None,
                      weights.dtype if weights is not None else None, None)
        ctx.shape = source.shape
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):  # noqa: D102
        if ctx.grads is None:
            raise RuntimeError("the chunked region loss forms its gradients in the forward pass and hands them out "
                               "once: a second backward through the same graph is not supported (recompute the loss)")
        stored, ctx.grads = ctx.grads, None
        # loss.backward() passes 1: on the CPU (no device sync) the stored gradients are then handed out as they are
        unit = grad_loss is not None and grad_loss.device.type == "cpu" and grad_loss.numel() == 1 and float(grad_loss) == 1.0
        out = []
        for g, dtype in zip(stored, ctx.dtypes):
            out.append(None if g is None or grad_loss is None else (g if unit else g.mul_(grad_loss)).to(dtype or g.dtype))
        grad_source, grad_p, grad_w, grad_lp = out
        if grad_source is not None:
            grad_source = grad_source.view(ctx.shape)
        return grad_source, grad_p, None, None, None, grad_w, grad_lp, None, None, None, None


def _apply(source, protos, teacher_probs, target_index, target_valid, temperature, weights, image_log_probs,
           ce_weight, kl_weight, chunk_rows) -> RegionTerms:
    if (weights is None) != (image_log_probs is None):
        raise ValueError("weights and image_log_probs go together (the bag term needs both)")
    if chunk_rows is None:
        chunk_rows = auto_chunk_rows(source.shape[1], teacher_probs.shape[-1], source.device)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int; got {chunk_rows!r}")
    tokens = source.shape[0] * source.shape[1]
    if target_index.dim() != 2 or target_index.shape[0] != tokens or target_valid.shape != target_index.shape:
        raise ValueError(f"target_index and target_valid must be [R * N = {tokens}, G]; got "
                         f"{list(target_index.shape)} and {list(target_valid.shape)}")
    if weights is not None and (weights.shape != source.shape[:2] or image_log_probs.shape != (source.shape[0], teacher_probs.shape[-1])):
        raise ValueError(f"weights must be [R, N] = {list(source.shape[:2])} and image_log_probs [R, K]; got "
                         f"{list(weights.shape)} and {list(image_log_probs.shape)}")
    return RegionTerms(*_ChunkedRegionTerms.apply(
        source, protos, teacher_probs.detach().float(), target_index, target_valid.to(torch.float32),
        weights, image_log_probs, float(temperature), float(ce_weight), float(kl_weight), chunk_rows,
    ))


def region_cross_entropy(
    logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    target_index: torch.Tensor,
    target_valid: torch.Tensor,
    temperature: float,
    *,
    weights: torch.Tensor | None = None,
    image_log_probs: torch.Tensor | None = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    chunk_rows: int | None = None,
) -> RegionTerms:
    """``ce = -sum_tk T_tk log q_tk`` and ``kl = sum_r KL(b_r || p_r)`` with ``log q = log_softmax(x / tau)``,
    chunk by chunk (``T_t = sum_g valid_tg Q[index_tg]``; ``b_r`` the bag of crop-image r's tokens).

    Shapes: ``logits`` [R, N, K] (R crop-images, each a bag of N tokens; any floating dtype, the
    gradient comes back in it); ``teacher_probs`` [M, K] (no gradient); ``target_index`` /
    ``target_valid`` [R * N, G]; ``weights`` [R, N] normalised, or None (no bag term: ``kl`` is 0);
    ``image_log_probs`` [R, K] (with ``weights``). ``chunk_rows``: crop-images per chunk, None = sized
    for the device (`auto_chunk_rows`).

    Returns `RegionTerms`: ``loss = ce_weight * ce + kl_weight * kl`` carries the gradient (to ``logits``,
    ``weights`` and ``image_log_probs``), formed in the forward pass and handed out by one backward
    (a second backward through the same graph raises); ``cross_entropy`` and ``kl`` are the 0-dim sums.

    Example:
        >>> x = torch.randn(4, 3, 16, requires_grad=True)
        >>> probs = torch.softmax(torch.randn(5, 16), -1)
        >>> index, valid = torch.randint(0, 5, (12, 2)), torch.ones(12, 2)
        >>> out = region_cross_entropy(x, probs, index, valid, 0.1)
        >>> ref = -(probs[index].sum(1) * torch.log_softmax(x.reshape(12, 16) / 0.1, -1)).sum()
        >>> bool(torch.allclose(out.cross_entropy, ref, rtol=1e-5))
        True
    """
    if logits.dim() != 3 or logits.shape[-1] != teacher_probs.shape[-1]:
        raise ValueError(f"logits must be [R, N, K = {teacher_probs.shape[-1]}]; got {list(logits.shape)}")
    return _apply(logits, None, teacher_probs, target_index, target_valid, temperature, weights, image_log_probs,
                  ce_weight, kl_weight, chunk_rows)


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
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    chunk_rows: int = 64,
) -> RegionTerms:
    """`region_cross_entropy` of the logits ``z P^T``, with the prototype layer inside each chunk: the
    [R * N, K] logits never exist.

    Shapes: ``embedding`` [R, N, d] (``region_embedding``); ``prototypes`` [K, d]; the rest as in
    `region_cross_entropy`. ``chunk_rows`` crop-images per chunk (peak extra memory: a few
    ``chunk_rows * N * K`` float32). ``loss``'s gradient reaches ``embedding``, ``prototypes``,
    ``weights`` and ``image_log_probs``.
    """
    d = embedding.shape[-1]
    if embedding.dim() != 3 or prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"embedding must be [R, N, d] and prototypes [K, d]; got {list(embedding.shape)}, "
                         f"{list(prototypes.shape)}")
    return _apply(embedding, prototypes, teacher_probs, target_index, target_valid, temperature, weights,
                  image_log_probs, ce_weight, kl_weight, chunk_rows)
