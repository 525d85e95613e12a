"""`MultiInstancePooling`: weigh the region tokens of a crop (a *bag* of instances) and pool them.

CMD treats every crop as a bag whose instances are its region tokens ``h_1 .. h_N``. The pooling
gives non-negative weights ``w`` over the instances (``sum_j w_j = 1`` over the kept instances) and a
bag vector. Modes:

========================  ===================================================  =====================
mode                      weights ``w_j``                                      bag vector
========================  ===================================================  =====================
``"mean"``                ``1 / N``                                            ``sum_j w_j h_j``
``"sum"``                 ``1 / N``                                            ``sum_j h_j``
``"max"``                 share of the D dimensions where ``h_j`` is largest    element-wise max
``"attention"``           ``softmax_j(u^T tanh(V h_j))``  (Ilse et al. 2018)   ``sum_j w_j h_j``
``"gated_attention"``     ``softmax_j(u^T (tanh(V h_j) * sigmoid(U h_j)))``    ``sum_j w_j h_j``
========================  ===================================================  =====================

``V, U`` are ``hidden_dim x dim`` linear maps (with bias), ``u`` a ``hidden_dim`` vector (no bias: a
constant shift cancels in the softmax). The attention logits and the softmax are computed in
float32 with autocast disabled, so bf16 / fp16 autocast and token values of magnitude 1e4 give
finite weights.

Example:
    >>> import torch
    >>> pool = MultiInstancePooling(dim=8, mode="gated_attention", hidden_dim=4)
    >>> bag, w = pool(torch.randn(2, 49, 8))
    >>> bag.shape, w.shape, bool(torch.allclose(w.sum(1), torch.ones(2)))
    (torch.Size([2, 8]), torch.Size([2, 49]), True)
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiInstancePooling", "POOLING_MODES", "PoolingMode"]

PoolingMode = Literal["mean", "sum", "max", "attention", "gated_attention"]
POOLING_MODES: tuple[str, ...] = ("mean", "sum", "max", "attention", "gated_attention")


class MultiInstancePooling(nn.Module):
    """Multiple-instance pooling of region tokens ``[B, N, D]`` into bag vectors ``[B, D]``.

    Args:
        dim: D, the token dimension.
        mode: one of ``"mean"``, ``"sum"``, ``"max"``, ``"attention"``, ``"gated_attention"``
            (see the module docstring for the formulas).
        hidden_dim: H, the width of the attention network (attention modes only; 128 by default,
            as in Ilse et al.).
        dropout: dropout probability on the H-dimensional attention features (attention modes).

    Call:
        ``pool(tokens, mask=None) -> (bag, weights)``

        - ``tokens``: [B, N, D], any floating dtype, any N >= 1.
        - ``mask``: optional [B, N] bool, **True where the instance is kept** (the convention of
          ``torch.nn.functional.scaled_dot_product_attention``'s boolean mask); False instances get
          weight exactly 0 and do not enter the bag. Every row needs at least one True.
        - ``bag``: [B, D] in the dtype of ``tokens``.
        - ``weights``: [B, N] float32 (float64 for float64 tokens), ``>= 0``, summing to 1 over the kept instances of each row.

    The parameters (``attention_V``, ``attention_U``, ``attention_u``) exist only in the attention
    modes; "mean", "sum" and "max" have none.

    Example:
        >>> import torch
        >>> pool = MultiInstancePooling(dim=4, mode="mean")
        >>> tokens = torch.arange(12.0).reshape(1, 3, 4)
        >>> bag, w = pool(tokens, mask=torch.tensor([[True, True, False]]))
        >>> bag.tolist(), w.tolist()
        ([[2.0, 3.0, 4.0, 5.0]], [[0.5, 0.5, 0.0]])
    """

    def __init__(
        self,
        dim: int,
        mode: PoolingMode = "gated_attention",
        hidden_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if mode not in POOLING_MODES:
            raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
        if not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.dim = dim
        self.mode = mode
        self.hidden_dim = hidden_dim
        if self.is_attention:
            self.attention_V = nn.Linear(dim, hidden_dim)
            self.attention_U = nn.Linear(dim, hidden_dim) if mode == "gated_attention" else None
            self.attention_u = nn.Linear(hidden_dim, 1, bias=False)
            self.dropout = nn.Dropout(dropout)

    @property
    def is_attention(self) -> bool:
        """True for the learned modes ("attention", "gated_attention")."""
        return self.mode in ("attention", "gated_attention")

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, mode={self.mode!r}"
        return s + (f", hidden_dim={self.hidden_dim}" if self.is_attention else "")

    def attention_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """The unnormalised attention scores ``u^T (...)`` of every instance, in float32.

        Args:
            tokens: [B, N, D].

        Returns:
            [B, N] float32 (no masking applied).
        """
        if not self.is_attention:
            raise ValueError(f"attention_logits needs an attention mode, this pooling is {self.mode!r}")
        ct = _compute_dtype(tokens)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            h = tokens.to(ct)
            v, u = self.attention_V, self.attention_U
            a = torch.tanh(F.linear(h, v.weight.to(ct), v.bias.to(ct)))
            if u is not None:
                a = a * torch.sigmoid(F.linear(h, u.weight.to(ct), u.bias.to(ct)))
            a = self.dropout(a)
            return F.linear(a, self.attention_u.weight.to(ct)).squeeze(-1)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``tokens`` [B, N, D] (``mask`` [B, N] bool, True = kept) into ``(bag [B, D], weights [B, N])``."""
        self._check_inputs(tokens, mask)
        if self.mode == "max":
            return self._max(tokens, mask)
        if mask is not None:  # masked instances contribute exactly nothing, even if they hold inf / NaN
            tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0)
        if self.is_attention:
            logits = self.attention_logits(tokens)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(logits, dim=1)
        else:  # mean / sum
            weights = self._uniform_weights(tokens, mask)
        ct = weights.dtype
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            if self.mode == "sum":
                bag = tokens.to(ct).sum(dim=1)
            else:
                bag = torch.einsum("bn,bnd->bd", weights, tokens.to(ct))
        return bag.to(tokens.dtype), weights

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a [B, N, D] tensor, got {shape}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
        b, n, d = tokens.shape
        if d != self.dim:
            raise ValueError(f"tokens must have D = dim = {self.dim} channels, got shape {tuple(tokens.shape)}")
        if n == 0:
            raise ValueError(f"tokens must hold at least one instance per bag, got shape {tuple(tokens.shape)}")
        if mask is None:
            return
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = kept instance), got {mask.dtype}")
        if tuple(mask.shape) != (b, n):
            raise ValueError(f"mask must have shape [B, N] = {[b, n]}, got {list(mask.shape)}")
        # The one host sync of this module, only when a mask is given: an all-masked bag has no weights.
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            rows = empty.nonzero().flatten()[:10].tolist()
            raise ValueError(f"every bag needs at least one unmasked instance; rows {rows} are fully masked")

    @staticmethod
    def _uniform_weights(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = tokens.shape
        ct = _compute_dtype(tokens)
        if mask is None:
            return torch.full((b, n), 1.0 / n, dtype=ct, device=tokens.device)
        kept = mask.to(ct)
        return kept / kept.sum(dim=1, keepdim=True)

    @staticmethod
    def _max(tokens: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = tokens.shape
        if mask is not None:
            tokens = tokens.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        bag, winner = tokens.max(dim=1)  # [B, D] each; the gradient flows to the winning instance
        ct = _compute_dtype(tokens)
        counts = torch.zeros(b, n, dtype=ct, device=tokens.device)
        counts.scatter_add_(1, winner, torch.ones(b, d, dtype=ct, device=tokens.device))
        return bag, counts / d


def _compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    """float32 for half / bfloat16 / float32 tokens, float64 for float64 tokens."""
    return torch.promote_types(tokens.dtype, torch.float32)
