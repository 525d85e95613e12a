"""`CrossLevelOutput`: the image- and region-level outputs of a `CrossLevelHead` for a batch of crops."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

__all__ = ["CrossLevelOutput", "OUTPUT_FIELDS"]

#: Fields that hold one row per crop-image (``prototypes`` is shared by all rows).
_PER_ROW = ("image", "region", "tokens", "mil_weights", "region_embedding", "pooled")
#: Every field name, e.g. for ``CrossLevelHead.forward(..., outputs=...)``.
OUTPUT_FIELDS = (*_PER_ROW, "prototypes")


@dataclass
class CrossLevelOutput:
    """Image-level and region-level predictions of a batch of crops of one resolution.

    Several crops of the same resolution are stacked *crop-major* along the batch: rows
    ``[c * B, (c + 1) * B)`` hold crop ``c`` of every image (DINO's multi-crop layout).

    Attributes:
        image: [B, K] image-level logits (the image head's output).
        region: [B, N, K] region-level logits (the region head on every token), or None.
        tokens: [B, N, D] the backbone region tokens (used to match student to teacher regions), or None.
            Formerly ``features`` (a deprecated read-only alias remains).
        mil_weights: [B, N] multi-instance pooling weights (>= 0, rows sum to 1), or None.
            Formerly ``weights`` (a deprecated read-only alias remains).
        region_embedding: [B, N, bottleneck] the region head's L2-normalised bottleneck, the input of
            its prototype layer, for the loss's fused region path (see `cmd.losses.fused`), or None.
        pooled: [B, D] the image vector the image head received (the backbone's pooled vector, or the
            MIL bag vector with ``image_input="mil"``), e.g. for the KoLeo term, or None.
        prototypes: [K, bottleneck] the region head's effective prototype matrix, computed inside the
            head's forward (so DDP sees it) along with ``region_embedding``; not per row. Or None.

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
    tokens: torch.Tensor | None = None
    mil_weights: torch.Tensor | None = None
    region_embedding: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    prototypes: torch.Tensor | None = None

    def __init__(  # the dataclass's own, plus the deprecated keywords features= / weights=
        self, image: torch.Tensor, region: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
        mil_weights: torch.Tensor | None = None, region_embedding: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None, prototypes: torch.Tensor | None = None, *,
        features: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    ) -> None:
        for old, new, value, current in (("features", "tokens", features, tokens),
                                         ("weights", "mil_weights", weights, mil_weights)):
            if value is not None:
                if current is not None:
                    raise TypeError(f"give {new}= only (features= / weights= are its deprecated names)")
                warnings.warn(f"CrossLevelOutput({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=2)
        self.image, self.region, self.region_embedding, self.pooled = image, region, region_embedding, pooled
        self.tokens = tokens if features is None else features
        self.mil_weights = mil_weights if weights is None else weights
        self.prototypes = prototypes

    @property
    def features(self) -> torch.Tensor | None:
        """Deprecated alias of ``tokens``."""
        warnings.warn("CrossLevelOutput.features is deprecated; use .tokens", DeprecationWarning, stacklevel=2)
        return self.tokens

    @property
    def weights(self) -> torch.Tensor | None:
        """Deprecated alias of ``mil_weights``."""
        warnings.warn("CrossLevelOutput.weights is deprecated; use .mil_weights", DeprecationWarning, stacklevel=2)
        return self.mil_weights

    @property
    def batch_size(self) -> int:
        """The number of rows (crops x images)."""
        return self.image.shape[0]

    @property
    def num_tokens(self) -> int | None:
        """N, the number of region tokens per crop (None without region outputs)."""
        for t in (self.region, self.tokens, self.mil_weights, self.region_embedding):
            if t is not None:
                return t.shape[1]
        return None

    @classmethod
    def cat(cls, outputs: Sequence[CrossLevelOutput]) -> CrossLevelOutput:
        """Stack outputs of the same token count along the batch (crop-major).

        A field is None in the result when it is None in any input; ``prototypes`` is the first's.
        """
        if len(outputs) == 0:
            raise ValueError("CrossLevelOutput.cat needs at least one output")
        values = {}
        for name in _PER_ROW:
            parts = [getattr(o, name) for o in outputs]
            values[name] = None if any(p is None for p in parts) else torch.cat(parts, dim=0)
        return cls(**values, prototypes=outputs[0].prototypes)

    def split(self, n_crops: int) -> list[CrossLevelOutput]:
        """Split the crop-major batch into ``n_crops`` outputs of ``batch_size // n_crops`` rows each."""
        if n_crops <= 0 or self.batch_size % n_crops != 0:
            raise ValueError(f"cannot split a batch of {self.batch_size} rows into {n_crops} equal crops")
        b = self.batch_size // n_crops
        chunks = {n: (None if getattr(self, n) is None else getattr(self, n).split(b, dim=0)) for n in _PER_ROW}
        return [
            type(self)(**{n: (None if p is None else p[c]) for n, p in chunks.items()}, prototypes=self.prototypes)
            for c in range(n_crops)
        ]

    def detach(self) -> CrossLevelOutput:
        """A copy whose tensors carry no gradient (e.g. teacher outputs)."""
        return type(self)(
            **{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).detach()) for f in fields(self)}
        )
