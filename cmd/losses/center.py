"""Teacher normalisation: `Center` (DINO's centering) and `sinkhorn_knopp` (DINOv2 / SwAV).

Both turn teacher logits [R, K] into target distributions in float32, without gradient, and both are
correct under ``torch.distributed``: the statistics that span the batch are summed over processes
through `cmd.distributed`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmd import distributed as dist
from cmd.losses.fused import auto_chunk_rows

__all__ = ["Center", "sinkhorn_knopp"]

_TINY = torch.finfo(torch.float32).tiny


class Center(nn.Module):
    """DINO's center: ``P = softmax((t - c) / tau)`` and ``c <- m c + (1 - m) mean(t)`` over the global batch.

    ``value`` is a [1, K] float32 buffer (in ``state_dict()``). Teacher logits are first
    *accumulated* (a running sum and row count, local to the process, no synchronisation), then
    ``update()`` all-reduces sum and count over processes and moves the center: with gradient
    accumulation, ``accumulate`` every micro-batch and ``update`` once per optimiser step. All
    processes must call ``update`` together (a collective). A batch whose mean is not finite (a NaN or
    inf teacher logit) leaves the center unchanged (checked on the device, no host synchronisation),
    so one bad batch cannot poison every later step.

    Example:
        >>> c = Center(3, momentum=0.5)
        >>> c.accumulate(torch.tensor([[2.0, 0.0, 4.0]])); c.update(); c.value
        tensor([[1., 0., 2.]])
        >>> c.softmax(torch.tensor([[1.0, 0.0, 2.0]]), temperature=1.0)[0]
        tensor([[0.3333, 0.3333, 0.3333]])
    """

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"out_dim must be an integer >= 1; got {out_dim!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1]; got {momentum!r}")
        self.out_dim, self.momentum = out_dim, float(momentum)
        self.register_buffer("value", torch.zeros(1, out_dim))
        # running [sum over rows (K), row count] of logits not yet applied; not saved
        self.register_buffer("pending", torch.zeros(out_dim + 1), persistent=False)

    def _scaled(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """``(logits - c) / tau`` [..., K] as a new float32 tensor, in one pass."""
        return torch.add(self.value * (-1.0 / temperature), logits.float(), alpha=1.0 / temperature)

    @torch.no_grad()
    def softmax(self, logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, log P)`` with ``P = softmax((logits - c) / tau)`` [..., K], float32, no gradient (any input dtype).

        Values of P below float32's smallest normal number (1.2e-38) are set to 0: a mass below float32's
        resolution of any sum, and sub-normal numbers slow every later CPU operation tens of times.
        """
        scaled = self._scaled(logits.detach(), temperature)
        # two kernels rather than exp(log P): an exp with sub-normal results is very slow on CPUs
        return F.threshold_(torch.softmax(scaled, dim=-1), _TINY, 0.0), torch.log_softmax(scaled, dim=-1)

    @torch.no_grad()
    def softmax_entropy(self, logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, H(P))``: ``P`` as `softmax` gives it [..., K] and its entropy per row [...], without forming ``log P``.

        With ``s`` the scaled centered logits, ``log P = (s - max s) + log max P``, so
        ``H = -P.(s - max s) - log max P``: two sums of one sign (``max P >= 1/K``), as precise as
        ``-P.log P`` at one exponential less.

        Example:
            >>> p, h = Center(4).softmax_entropy(torch.zeros(2, 4), temperature=0.1)
            >>> [round(float(x), 4) for x in h]  # log 4
            [1.3863, 1.3863]
        """
        flat = logits.detach().reshape(-1, self.out_dim)
        probs = torch.empty(flat.shape, device=flat.device, dtype=torch.float32)
        entropy = torch.empty(flat.shape[0], device=flat.device, dtype=torch.float32)
        step = auto_chunk_rows(1, self.out_dim, flat.device)  # the chunks of the student's region terms
        for r0 in range(0, flat.shape[0], step):  # cache-sized chunks of rows on a CPU: one pass over memory
            scaled = self._scaled(flat[r0 : r0 + step], temperature)
            scaled.sub_(scaled.amax(dim=-1, keepdim=True))
            p = F.threshold_(torch.softmax(scaled, dim=-1), _TINY, 0.0)
            dot = scaled.mul_(p).sum(dim=-1)  # P.(s - max s), in place of the shifted logits
            torch.sub(dot.neg_(), p.amax(dim=-1).log_(), out=entropy[r0 : r0 + step])
            probs[r0 : r0 + step] = p
        return probs.view(logits.shape), entropy.view(logits.shape[:-1])

    @torch.no_grad()
    def accumulate(self, logits: torch.Tensor) -> None:
        """Add the rows of ``logits`` [..., K] to the running sum and count (no synchronisation)."""
        flat = logits.detach().reshape(-1, self.out_dim)
        self.pending[:-1] += flat.sum(dim=0, dtype=torch.float32).to(self.pending.device)
        self.pending[-1] += flat.shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """All-reduce the running sum and count and move the center toward the batch mean (collective)."""
        pending = dist.all_reduce_sum(self.pending.clone())
        count = pending[-1]
        mean = (pending[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        ok = (count > 0) & torch.isfinite(mean).all()
        updated = self.value * self.momentum + mean * (1.0 - self.momentum)
        self.value.copy_(torch.where(ok, updated, self.value))
        self.pending.zero_()

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, momentum={self.momentum}"


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV; DINOv2's alternative to centering), over the global batch.

    With ``Q = exp(logits / tau)`` as a [K, R] matrix (prototypes x samples, R the rows of all
    processes), each iteration divides every prototype row by its sum over the samples times K (each
    prototype then holds mass 1 / K) and every sample column by its sum times R (each sample 1 / R);
    the result is ``R * Q`` transposed, each sample a distribution over the K prototypes (the papers'
    first scaling to total mass 1 is a constant that the first division removes). Computed in log
    space (logsumexp), so logits up to 1e4 neither overflow nor leave a sample without mass; the sums
    over samples are all-reduced (a max and a sum per iteration), so under DDP the result equals one
    process on the whole batch. ``logits`` [R, K] of this process (any dtype) give [R, K] float32
    rows summing to 1 (DINOv2 runs 3 iterations).

    Example:
        >>> q = sinkhorn_knopp(torch.randn(6, 4), 0.1)
        >>> torch.allclose(q.sum(-1), torch.ones(6))
        True
    """
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be an integer >= 1; got {n_iterations!r}")
    log_q = logits.detach().float().reshape(-1, logits.shape[-1]) / temperature  # [R, K]
    log_k = math.log(log_q.shape[1])
    log_r = dist.all_reduce_sum(torch.tensor([float(log_q.shape[0])], device=log_q.device)).log()
    for _ in range(n_iterations):
        peak = dist.all_reduce_max(log_q.amax(dim=0))  # per prototype, over the global batch
        mass = dist.all_reduce_sum((log_q - peak).exp_().sum(dim=0))  # >= 1: the peak's own term
        log_q -= (mass.log_() + peak + log_k).unsqueeze(0)  # prototypes: 1 / K each
        log_q -= torch.logsumexp(log_q, dim=1, keepdim=True) + log_r  # samples: 1 / R each
    return F.threshold_(log_q.add_(log_r).exp_(), _TINY, 0.0)  # sub-normal values: 0 (slow on CPUs)
