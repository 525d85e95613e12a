"""`BackboneOutput`: what every backbone returns for one batch of crops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BackboneOutput"]


@dataclass
class BackboneOutput:
    """The image vector and the region (patch) tokens of a batch of crops.

    Attributes:
        pooled: [B, D] the image-level vector (ViT: CLS token after the final norm; Swin: mean of
            the final-stage tokens; CNN: global average of the last feature map).
        tokens: [B, N, D] the region tokens, N = h * w, in row-major order over the grid
            (ViT: patch tokens only, no CLS or registers; Swin: final-stage tokens after the norm;
            CNN: the last feature map flattened).
        grid: (h, w) the token grid, so ``tokens.reshape(B, h, w, D)`` is the spatial layout.

    Example:
        >>> import torch
        >>> out = BackboneOutput(torch.zeros(2, 8), torch.zeros(2, 4, 8), (2, 2))
        >>> out.num_tokens
        4
    """

    pooled: torch.Tensor
    tokens: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        """N, the number of region tokens per crop."""
        return self.tokens.shape[1]

    @property
    def batch_size(self) -> int:
        """B."""
        return self.tokens.shape[0]
