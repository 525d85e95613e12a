"""`CMDNetwork`: a backbone and a `CrossLevelHead` over multi-crop input (the student or the teacher).

``crops`` (a list of ``[B, 3, H_c, W_c]`` tensors, e.g. 2 global 224 px crops then 8 local 96 px crops)
are grouped into runs of consecutive crops of one size; the backbone runs once per group on the
crop-major stack ``[n_c * B, 3, H, W]`` (``Backbone.forward_multicrop``) and the head once per group,
giving one `CrossLevelOutput` per group with rows ``[c * B, (c + 1) * B)`` = crop ``c`` of the group.

The teacher is ``copy.deepcopy(student)`` updated by EMA; it sees the global crops only::

    student_out = student(crops)        # [CrossLevelOutput(2B rows, N=49), CrossLevelOutput(8B rows, N=9)]
    teacher_out = teacher(crops[:2])    # [CrossLevelOutput(2B rows, N=49)]

Example:
    >>> import torch
    >>> from cmd.backbones import create_backbone  # doctest: +SKIP
    >>> net = CMDNetwork(create_backbone("vit_tiny_patch16_224"), CrossLevelHead(192, out_dim=64))  # doctest: +SKIP
    >>> [o.image.shape for o in net([torch.randn(2, 3, 224, 224)] * 2 + [torch.randn(2, 3, 96, 96)])]  # doctest: +SKIP
    [torch.Size([4, 64]), torch.Size([2, 64])]
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import torch
from torch import nn

from cmd.backbones.output import BackboneOutput
from cmd.heads.dino_head import _register_pre_hook
from cmd.heads.output import CrossLevelOutput

__all__ = ["CMDNetwork"]

# DINO / EsViT checkpoints: MultiCropWrapper(backbone, head[, head_dense]) -> our head.image_head / head.region_head
_LEGACY_IMAGE_HEAD = re.compile(r"^head\.(mlp|last_layer)\.")
_LEGACY_REGION_HEAD = "head_dense."


def _group_sizes(crops: Sequence[torch.Tensor]) -> list[int]:
    """Sizes of the runs of consecutive crops with the same spatial size (``[2, 8]`` for 2 + 8 crops)."""
    groups: list[int] = []
    previous = None
    for crop in crops:
        size = tuple(crop.shape[-2:])
        if size == previous:
            groups[-1] += 1
        else:
            groups.append(1)
            previous = size
    return groups


class CMDNetwork(nn.Module):
    """Backbone + cross-level head applied to a list of crops, one output per resolution group.

    Args:
        backbone: a module with ``forward_multicrop(crops: Sequence[Tensor]) -> list[BackboneOutput]``
            (one ``BackboneOutput(pooled [n*B, D], tokens [n*B, N, D], grid)`` per group of
            consecutive same-size crops, stacked crop-major), e.g. ``cmd.create_backbone(...)``.
        head: a `CrossLevelHead` (or any module with ``head(tokens, pooled) -> CrossLevelOutput``).

    State-dict keys are ``backbone.*`` and ``head.*``. Head weights of DINO / EsViT checkpoints
    (keys ``head.mlp.*``, ``head.last_layer.weight_g|weight_v`` and EsViT's ``head_dense.*``) load
    into ``head.image_head`` / ``head.region_head`` directly (strip a DDP ``module.`` prefix first;
    the backbone keys of those checkpoints need `cmd.load_checkpoint`'s conversion).

    Shapes:
        ``forward(crops)``: ``crops`` a list of V tensors ``[B, 3, H_v, W_v]`` (a single tensor is
        one crop) -> list of `CrossLevelOutput`, one per group, with ``image [n*B, K]``,
        ``region [n*B, N, K]``, ``tokens [n*B, N, D]``, ``mil_weights [n*B, N]``.

    Example:
        >>> import torch
        >>> from cmd.backbones.output import BackboneOutput
        >>> from cmd.heads import CrossLevelHead
        >>> from itertools import groupby
        >>> class Patches(torch.nn.Module):  # a toy backbone: 4x4 patches, D = 48
        ...     def forward_multicrop(self, crops):
        ...         outs = []
        ...         for (h, w), group in groupby(crops, key=lambda c: tuple(c.shape[-2:])):
        ...             t = torch.nn.functional.unfold(torch.cat(list(group)), 4, stride=4).transpose(1, 2)
        ...             outs.append(BackboneOutput(t.mean(1), t, (h // 4, w // 4)))
        ...         return outs
        >>> net = CMDNetwork(Patches(), CrossLevelHead(48, out_dim=10, hidden_dim=8, bottleneck_dim=4))
        >>> outs = net([torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 3)
        >>> [(o.image.shape[0], o.num_tokens) for o in outs]
        [(4, 16), (6, 4)]
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_multicrop", None)):
            raise TypeError(
                f"backbone must provide forward_multicrop(crops) -> list[BackboneOutput], "
                f"got {type(backbone).__name__} without it"
            )
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module (e.g. CrossLevelHead), got {type(head).__name__}")
        self.backbone = backbone
        self.head = head
        _register_pre_hook(self, _load_legacy_heads)

    @property
    def out_dim(self) -> int | None:
        """K, the head's number of prototypes (None when the head does not say)."""
        return getattr(self.head, "out_dim", None)

    @property
    def embed_dim(self) -> int | None:
        """D, the backbone's token dimension (``backbone.num_features`` / ``embed_dim`` when present)."""
        for name in ("num_features", "embed_dim"):
            value = getattr(self.backbone, name, None)
            if isinstance(value, int):
                return value
        return None

    def forward_backbone(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> list[BackboneOutput]:
        """The backbone outputs, one ``BackboneOutput`` per resolution group (crop-major)."""
        crops = self._as_crop_list(crops)
        outputs = list(self.backbone.forward_multicrop(crops))
        groups = _group_sizes(crops)
        batch = crops[0].shape[0]
        got = [o.tokens.shape[0] for o in outputs]
        if got != [n * batch for n in groups]:
            raise RuntimeError(
                f"backbone.forward_multicrop returned groups of {got} rows; expected {[n * batch for n in groups]} "
                f"(consecutive same-size crops {groups} x batch {batch}, stacked crop-major)"
            )
        return outputs

    def forward(
        self, crops: Sequence[torch.Tensor] | torch.Tensor, *, outputs: Collection[str] | None = None
    ) -> list[CrossLevelOutput]:
        """One `CrossLevelOutput` per resolution group of ``crops`` (rows crop-major).

        ``outputs``: the fields to compute, passed to the head (e.g. ``loss.student_outputs``).
        """
        kwargs = {} if outputs is None else {"outputs": outputs}
        return [self.head(out.tokens, out.pooled, **kwargs) for out in self.forward_backbone(crops)]

    @staticmethod
    def _as_crop_list(crops: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        crops = list(crops)
        if not crops:
            raise ValueError("crops must hold at least one [B, 3, H, W] tensor, got an empty sequence")
        batch = crops[0].shape[0] if isinstance(crops[0], torch.Tensor) else None
        for i, crop in enumerate(crops):
            if not isinstance(crop, torch.Tensor) or crop.dim() != 4:
                shape = tuple(crop.shape) if isinstance(crop, torch.Tensor) else type(crop).__name__
                raise ValueError(f"crops[{i}] must be a [B, C, H, W] tensor, got {shape}")
            if crop.shape[0] != batch:
                raise ValueError(f"every crop must hold the same batch B = {batch}; crops[{i}] has {crop.shape[0]}")
        if batch == 0:
            raise ValueError("the crops hold an empty batch (B = 0): pass at least one image per crop")
        return crops


def _load_legacy_heads(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """Map DINO / EsViT head keys (``head.mlp.*``, ``head.last_layer.*``, ``head_dense.*``) onto ours."""
    head = module.head
    if not hasattr(head, "image_head"):
        return
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix) :]
        if _LEGACY_IMAGE_HEAD.match(rest):
            state_dict[f"{prefix}head.image_head.{rest[len('head.'):]}"] = state_dict.pop(key)
        elif rest.startswith(_LEGACY_REGION_HEAD) and getattr(head, "region_head", None) is not None:
            state_dict[f"{prefix}head.region_head.{rest[len(_LEGACY_REGION_HEAD):]}"] = state_dict.pop(key)
