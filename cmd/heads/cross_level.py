"""`CrossLevelHead`: multi-instance pooling + an image head + a region head over one batch of crops.

For a batch of crops with region tokens ``F [B, N, D]`` and image vectors ``pooled [B, D]``:

- ``pooling`` weighs the N regions of each crop: ``mil_weights [B, N]`` (and a bag vector ``[B, D]``);
- ``image_head`` maps the image vector (``image_input="pooled"``: the backbone's pooled vector, as in
  EsViT; ``"mil"``: the multi-instance bag vector) to image logits ``[B, K]``;
- ``region_head`` maps every region token (all ``B * N`` in one batched call) to region logits
  ``[B, N, K]``;
- ``tokens`` are the backbone tokens themselves (used by the loss to match student and teacher
  regions), not a head output.

Memory of the outputs for the default recipe (Swin-T, D = 768, per-process batch B = 64, K = 65536;
student: 2 x 224 px crops of 49 tokens + 8 x 96 px crops of 9 tokens = 170 tokens per image; teacher:
the 2 global crops = 98 tokens per image). GB = 1e9 bytes:

==========================  =====================  ============  =================
output                      elements               float32       bf16 / fp16
==========================  =====================  ============  =================
student ``region``          64 * 170 * 65536       2.85 GB       1.43 GB
teacher ``region``          64 * 98 * 65536        1.64 GB       0.82 GB
student ``image``           64 * 10 * 65536        0.17 GB       0.08 GB
teacher ``image``           64 * 2 * 65536         0.03 GB       0.02 GB
student ``tokens``          64 * 170 * 768         0.03 GB       0.02 GB
``mil_weights``             64 * 170               44 KB (always float32)
==========================  =====================  ============  =================

The region logits dominate. Under ``torch.autocast`` (bf16 / fp16) the region head's last layer
already produces logits in the autocast dtype, halving the two large rows; ``region_dtype`` makes
that explicit and independent of the caller's autocast state (e.g. a teacher forward run outside
autocast). A float32 ``log_softmax`` / ``softmax`` of the region logits in the loss needs the
float32 size again, transiently. The image logits are small and follow the ambient precision.

Example:
    >>> import torch
    >>> head = CrossLevelHead(16, out_dim=32, hidden_dim=8, bottleneck_dim=4)
    >>> out = head(torch.randn(2, 9, 16), pooled=torch.randn(2, 16))
    >>> out.image.shape, out.region.shape, out.tokens.shape, out.mil_weights.shape
    (torch.Size([2, 32]), torch.Size([2, 9, 32]), torch.Size([2, 9, 16]), torch.Size([2, 9]))
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import torch
from torch import nn

from cmd.heads.dino_head import DINOHead
from cmd.heads.output import OUTPUT_FIELDS, CrossLevelOutput
from cmd.pooling import POOLING_MODES, MultiInstancePooling

__all__ = ["CrossLevelHead"]

ImageInput = Literal["pooled", "mil"]
RegionOutput = Literal["logits", "embedding"]
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class CrossLevelHead(nn.Module):
    """Image- and region-level projection heads with multi-instance pooling of the regions.

    Args:
        in_dim: D, the backbone's token / image-vector dimension.
        out_dim: K, the number of prototypes (65536).
        pooling: a `MultiInstancePooling` mode name (``"mean"``, ``"sum"``, ``"max"``,
            ``"attention"``, ``"gated_attention"``), a `MultiInstancePooling` instance, or None
            (no pooling: ``mil_weights`` is None; only with ``image_input="pooled"``).
        image_input: what the image head sees: ``"pooled"`` the backbone's image vector (EsViT;
            ``forward`` then needs ``pooled``) or ``"mil"`` the pooling's bag vector.
        hidden_dim, bottleneck_dim, n_layers, use_bn, norm_last_layer: as in `DINOHead`, for both heads.
        share_prototypes: the two heads share one last layer (``region_head.last_layer is
            image_head.last_layer``), so both levels predict over the same K prototypes. The state
            dict then lists the shared tensors under both heads' names.
        region_head: False builds no region head (the "dino" preset): ``region`` is None.
        pooling_hidden_dim: H of the attention pooling (when ``pooling`` is a mode name).
        region_dtype: dtype of the region logits. None: the ambient precision (the autocast dtype
            under ``torch.autocast``, else float32). ``torch.bfloat16`` / ``torch.float16``: the
            region head runs under autocast to that dtype even when the caller does not autocast.
            ``torch.float32``: the region head runs with autocast disabled.
        region_output: ``"logits"`` (default): ``region`` holds the region logits [B, N, K].
            ``"embedding"``: the prototype layer is left to the loss: ``region`` is None and
            ``region_embedding`` holds the region head's L2-normalised bottleneck [B, N, bottleneck];
            with ``prototypes`` [K, bottleneck]; ``CMDLoss(fused_chunk_size=...)`` then computes logits,
            log-softmax, cross-entropy and bags chunk by chunk without ever holding the [B * N, K]
            logits. Only the default of ``forward(outputs=None)``: pass ``outputs=`` (e.g. a loss's
            ``student_outputs`` / ``teacher_outputs``) to choose per call.

    ``forward(tokens [B, N, D], pooled [B, D] | None = None, mask [B, N] bool | None = None, *,
    outputs=None)`` returns ``CrossLevelOutput(image [B, K], region [B, N, K] | None, tokens [B, N, D],
    mil_weights [B, N] float32 | None, ...)``. ``mask`` (True = kept region) goes to the pooling only;
    the region logits of masked tokens are still computed.

    Under DDP (without ``find_unused_parameters``) every parameter must reach the loss: call the
    student with ``outputs=loss.student_outputs`` and build the head only with the parts the loss
    consumes (a pooling only when ``"mil_weights" in loss.student_outputs`` or ``image_input="mil"``;
    a region head only when the loss uses region outputs).

    See the module docstring for the memory of each output in the default recipe.

    Example:
        >>> import torch
        >>> head = CrossLevelHead(16, out_dim=32, pooling="mean", image_input="mil", hidden_dim=8,
        ...                       bottleneck_dim=4, share_prototypes=True)
        >>> out = head(torch.randn(3, 4, 16))
        >>> out.image.shape, out.region.shape, head.region_head.last_layer is head.image_head.last_layer
        (torch.Size([3, 32]), torch.Size([3, 4, 32]), True)
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        pooling: str | MultiInstancePooling | None = "gated_attention",
        image_input: ImageInput = "pooled",
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        share_prototypes: bool = False,
        region_head: bool = True,
        pooling_hidden_dim: int = 128,
        region_dtype: torch.dtype | None = None,
        region_output: RegionOutput = "logits",
    ) -> None:
        super().__init__()
        if image_input not in ("pooled", "mil"):
            raise ValueError(f"image_input must be 'pooled' or 'mil', got {image_input!r}")
        if isinstance(pooling, str):
            if pooling not in POOLING_MODES:
                raise ValueError(f"pooling must be one of {POOLING_MODES}, a MultiInstancePooling or None, got {pooling!r}")
            pooling = MultiInstancePooling(in_dim, mode=pooling, hidden_dim=pooling_hidden_dim)
        elif pooling is not None and not isinstance(pooling, MultiInstancePooling):
            raise TypeError(f"pooling must be a mode name, a MultiInstancePooling or None, got {type(pooling).__name__}")
        if pooling is not None and pooling.dim != in_dim:
            raise ValueError(f"pooling.dim must equal in_dim = {in_dim}, got {pooling.dim}")
        if pooling is None and image_input == "mil":
            raise ValueError("image_input='mil' needs a pooling (got pooling=None)")
        if region_dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"region_dtype must be None, torch.float32, torch.float16 or torch.bfloat16, got {region_dtype}")
        if region_output not in ("logits", "embedding"):
            raise ValueError(f"region_output must be 'logits' or 'embedding', got {region_output!r}")
        if share_prototypes and not region_head:
            raise ValueError("share_prototypes=True needs region_head=True")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.image_input = image_input
        self.region_dtype = region_dtype
        self.region_output = region_output
        self.share_prototypes = share_prototypes
        self.pooling = pooling
        head_kwargs = dict(
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            n_layers=n_layers,
            use_bn=use_bn,
            norm_last_layer=norm_last_layer,
        )
        self.image_head = DINOHead(in_dim, **head_kwargs)
        self.region_head = DINOHead(in_dim, **head_kwargs) if region_head else None
        if share_prototypes:
            self.region_head.last_layer = self.image_head.last_layer

    @property
    def has_region_head(self) -> bool:
        """True when region logits are computed."""
        return self.region_head is not None

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, image_input={self.image_input!r}, "
            f"share_prototypes={self.share_prototypes}, region_dtype={self.region_dtype}, "
            f"region_output={self.region_output!r}"
        )

    def forward(
        self,
        tokens: torch.Tensor,
        pooled: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        outputs: Collection[str] | None = None,
    ) -> CrossLevelOutput:
        """Image logits [B, K] and whichever of the region-level outputs are asked for.

        ``outputs``: the `CrossLevelOutput` fields to compute (e.g. a loss's ``student_outputs``); the
        others are None and nothing that only they need is run, so every parameter that runs reaches
        the loss (DDP without ``find_unused_parameters``). None (default): ``image``, ``tokens``,
        ``mil_weights`` (with a pooling) and ``region`` or ``region_embedding`` + ``prototypes``
        (per ``region_output``). ``image`` and ``tokens`` are always given.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.in_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must have shape [B, N, D = {self.in_dim}], got {shape}")
        b = tokens.shape[0]
        if b == 0 or tokens.shape[1] == 0:
            raise ValueError(f"tokens is empty (shape {list(tokens.shape)}): the head needs B >= 1 crops of N >= 1 tokens")
        weight_dtype = next(self.image_head.parameters()).dtype
        for name, t in (("tokens", tokens), ("pooled", pooled)):
            if t is not None and t.dtype != weight_dtype and not torch.is_autocast_enabled(t.device.type):
                raise TypeError(
                    f"{name} are {t.dtype} but the head's weights are {weight_dtype}: run the head under "
                    f"torch.autocast (as the backbone ran) or cast with {name}.to({weight_dtype})"
                )
        if pooled is not None and tuple(pooled.shape) != (b, self.in_dim):
            raise ValueError(f"pooled must have shape [B, D] = {[b, self.in_dim]}, got {list(pooled.shape)}")
        if self.image_input == "pooled" and pooled is None:
            raise ValueError(
                "image_input='pooled' needs the backbone's image vector `pooled` [B, D]; pass it or "
                "build the head with image_input='mil'"
            )
        if mask is not None and self.pooling is None:
            raise ValueError("a mask was given but this head has no pooling to apply it to")
        if outputs is None:
            region_field = "region_embedding" if self.region_output == "embedding" else "region"
            want = {"image", "tokens"} | ({region_field} if self.region_head is not None else set())
            want |= {"mil_weights"} if self.pooling is not None else set()
        else:
            want = set(outputs)
            unknown = want - set(OUTPUT_FIELDS)
            if unknown:
                raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {OUTPUT_FIELDS}")
        if "mil_weights" in want and self.pooling is None:
            raise ValueError("mil_weights were asked for, but this head has no pooling (pooling=None)")
        if want & {"region", "region_embedding", "prototypes"} and self.region_head is None:
            raise ValueError(f"{sorted(want & {'region', 'region_embedding', 'prototypes'})} were asked for, "
                             "but this head has no region head (region_head=False)")

        weights = bag = None
        if self.pooling is not None and ("mil_weights" in want or self.image_input == "mil"):
            bag, weights = self.pooling(tokens, mask)
        image_in = pooled if self.image_input == "pooled" else bag
        image = self.image_head(image_in)
        region = embedding = prototypes = None
        if "region" in want:
            region = self._region_logits(tokens, self.region_head)
        if "region_embedding" in want or "prototypes" in want:
            embedding = self._region_logits(tokens, self.region_head.bottleneck)
            prototypes = self.region_head.prototypes  # inside forward: DDP sees the parametrisation
        return CrossLevelOutput(
            image=image,
            region=region,
            tokens=tokens,
            mil_weights=weights if "mil_weights" in want else None,
            region_embedding=embedding,
            pooled=image_in if "pooled" in want else None,
            prototypes=prototypes,
        )

    def _region_logits(self, tokens: torch.Tensor, fn) -> torch.Tensor:
        b, n, d = tokens.shape
        flat = tokens.reshape(b * n, d)  # every region of every crop in one batched call
        dtype = self.region_dtype
        if dtype is None:
            logits = fn(flat)
        elif dtype == torch.float32:
            with torch.autocast(device_type=tokens.device.type, enabled=False):
                param_dtype = next(self.region_head.parameters()).dtype
                logits = fn(flat.to(param_dtype))
        else:
            with torch.autocast(device_type=tokens.device.type, dtype=dtype):
                logits = fn(flat)
            logits = logits.to(dtype)  # e.g. autocast unsupported for an op on this device
        return logits.reshape(b, n, -1)
