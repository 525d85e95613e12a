"""`CrossLevelOutput`: the image- and region-level outputs of a `CrossLevelHead` for a batch of crops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["CrossLevelOutput"]


@dataclass
class CrossLevelOutput:
    """Image-level and region-level predictions of a batch of crops of one resolution.

    Several crops of the same resolution are stacked *crop-major* along the batch: rows
    ``[c * B, (c + 1) * B)`` hold crop ``c`` of every image (DINO's multi-crop layout).

    Attributes:
        image: [B, K] image-level logits (the image head's output).
        region: [B, N, K] region-level logits (the region head on every token), or None when no
            region head is used (the "dino" preset).
        features: [B, N, D] the backbone region tokens used to match student to teacher regions
            (not the head outputs), or None.
        weights: [B, N] multi-instance pooling weights (>= 0, each row sums to 1), or None.
        region_embedding: [B, N, bottleneck] the region head's L2-normalised bottleneck features, the
            input of its prototype layer, when the head was asked for them instead of ``region``
            (``CrossLevelHead(region_output="embedding")``: the loss then applies the prototypes
            itself, fused with the cross-entropy, see `cmd.losses.fused`), else None.

    Example:
        >>> import torch
        >>> a = CrossLevelOutput(torch.zeros(2, 5), torch.zeros(2, 3, 5), torch.zeros(2, 3, 4),
        ...                      torch.full((2, 3), 1 / 3))
        >>> both = CrossLevelOutput.cat([a, a])
        >>> both.image.shape, len(both.split(2))
        (torch.Size([4, 5]), 2)
    """

    image: torch.Tensor
    region: torch.Tensor | None = None
    features: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    region_embedding: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        """The number of rows (crops x images)."""
        return self.image.shape[0]

    @property
    def num_tokens(self) -> int | None:
        """N, the number of region tokens per crop (None without region outputs)."""
        for t in (self.region, self.features, self.weights, self.region_embedding):
            if t is not None:
                return t.shape[1]
        return None

    @classmethod
    def cat(cls, outputs: Sequence[CrossLevelOutput]) -> CrossLevelOutput:
        """Stack outputs of the same token count along the batch (crop-major).

        A field is None in the result when it is None in any input.
        """
        if len(outputs) == 0:
            raise ValueError("CrossLevelOutput.cat needs at least one output")
        values = {}
        for f in fields(cls):
            parts = [getattr(o, f.name) for o in outputs]
            values[f.name] = None if any(p is None for p in parts) else torch.cat(parts, dim=0)
        return cls(**values)

    def split(self, n_crops: int) -> list[CrossLevelOutput]:
        """Split the crop-major batch into ``n_crops`` outputs of ``batch_size // n_crops`` rows each."""
        if n_crops <= 0 or self.batch_size % n_crops != 0:
            raise ValueError(f"cannot split a batch of {self.batch_size} rows into {n_crops} equal crops")
        b = self.batch_size // n_crops
        chunks = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).split(b, dim=0))
            for f in fields(self)
        }
        return [
            type(self)(**{name: (None if parts is None else parts[c]) for name, parts in chunks.items()})
            for c in range(n_crops)
        ]

    def detach(self) -> CrossLevelOutput:
        """A copy whose tensors carry no gradient (e.g. teacher outputs)."""
        return type(self)(
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).detach()) for f in fields(self)}
        )
