"""`Backbone`: one timm model behind one interface, for ViT, Swin and CNN families.

A `Backbone` turns a batch of crops of any size into a `BackboneOutput`: the image vector
``pooled [B, D]`` and the region tokens ``tokens [B, N, D]`` on a ``grid (h, w)`` with ``N = h * w``.

=========  =================================  =============================  ==========================
family     ``pooled [B, D]``                  ``tokens [B, N, D]``           grid at 224 px / 96 px
=========  =================================  =============================  ==========================
``vit``    CLS token after the final norm     patch tokens after the final   14x14 / 6x6 (patch 16)
           (``pooling="mean"``: mean of the   norm, no CLS, no registers
           patch tokens)
``swin``   mean of the tokens                 final-stage tokens after the   7x7 / 3x3 (Swin-T)
                                              final norm
``cnn``    global average of the last map     last feature map flattened     7x7 / 3x3 (ResNet-50)
=========  =================================  =============================  ==========================

Linear-probe features, `Backbone.forward_last_blocks` (``[B, F]``):

====================  ===  ======================================================  =================
model                 n    what is concatenated                                    F
====================  ===  ======================================================  =================
Swin-T (768 final)    1    mean token of the last block (= ``pooled``)              768
Swin-T                4    mean tokens of the last 4 blocks, stage 3 blocks 5, 6    384+384+768+768
                           (no norm) then stage 4 blocks 1, 2 (final norm)          = 2304
ViT-S/16 (384)        1    CLS token of the last block after the norm (=pooled)     384
ViT-S/16              4    CLS tokens of the last 4 blocks after the final norm     1536
ViT-S/16, avgpool     4    the above, then the mean patch token of the last block   1536 + 384 = 1920
ResNet-50             1    global average of ``layer4`` (= ``pooled``)               2048
ResNet-50             4    global averages of ``layer1..layer4``                     256+512+1024+2048
                                                                                   = 3840
====================  ===  ======================================================  =================

Crop sizes. One model accepts every crop size of a multi-crop recipe (timm's ``dynamic_img_size``
for ViT, ``strict_img_size=False`` for Swin, any size for CNNs); height and width must be multiples of
the patch size (ViT: 16, Swin: 4). Swin keeps the windows it was built for (the ``img_size`` given at
creation, 224 by default) and pads a stage whose resolution is not a multiple of the window: a 96 px
crop gives 24, 12, 6, 3 tokens per side and a final 3x3 grid, 160 px gives 5x5, 192 px 6x6.

Numerics. ``numerics`` says whose forward pass the backbone reproduces: ``"timm"`` (default),
``"esvit"`` (Swin: LayerNorm eps 1e-6, pad-then-shift windows) or ``"dino"`` (ViT: DINO's
position-embedding interpolation); see `cmd.backbones.numerics` for the measured differences.
`create_backbone` picks EsViT's / DINO's numerics for their checkpoints; `Backbone.set_numerics`
switches a backbone built with timm's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .output import BackboneOutput

__all__ = ["Backbone", "FAMILIES"]

FAMILIES = ("vit", "swin", "cnn")


def _is_swin(model: nn.Module) -> bool:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return isinstance(model, (SwinTransformer, SwinTransformerV2))


def _is_vit(model: nn.Module) -> bool:
    # VisionTransformer, its subclasses (DeiT distilled) and Eva share this interface.
    return all(hasattr(model, a) for a in ("num_prefix_tokens", "blocks", "patch_embed", "norm"))


def _detect_family(model: nn.Module) -> str:
    if _is_swin(model):
        return "swin"
    if _is_vit(model):
        return "vit"
    if hasattr(model, "forward_features") and getattr(model, "feature_info", None):
        return "cnn"
    raise TypeError(
        f"unsupported model {type(model).__name__}: expected a timm ViT (VisionTransformer/Eva), "
        "Swin (SwinTransformer/SwinTransformerV2) or CNN with feature_info and forward_features"
    )


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


class Backbone(nn.Module):
    """A timm model returning image vectors and region tokens for crops of any size.

    The timm model is the attribute ``model``, so this module's state-dict keys are
    ``model.<timm key>``. Build one with `create_backbone` or wrap a timm model directly.

    Args:
        model: a timm model created with ``num_classes=0`` (ViT with ``dynamic_img_size=True``,
            Swin with ``strict_img_size=False`` to accept several crop sizes).
        name: a label for the model (defaults to the class name).
        pooling: how ``pooled`` is computed: ``"cls"`` (ViT default when it has a class token) or
            ``"mean"`` (mean of the region tokens; the only choice for Swin and CNNs). ``None`` picks
            the family default.

    Attributes:
        model: the timm model.
        name: the model name.
        family: ``"vit"``, ``"swin"`` or ``"cnn"``.
        embed_dim: D, the width of ``pooled`` and ``tokens``.
        num_prefix_tokens: ViT prefix tokens (CLS, distillation, registers) removed from ``tokens``;
            0 for Swin and CNNs.
        patch_size: (ph, pw), input height and width must be multiples of it (1 for CNNs).
        pooling: ``"cls"`` or ``"mean"``.
        numerics: ``"timm"``, ``"esvit"`` or ``"dino"`` (see `cmd.backbones.numerics`), read from the model.
        load_report: the `LoadReport` of the checkpoint `create_backbone` loaded, else None.

    Example:
        >>> import torch
        >>> from cmd.backbones import create_backbone
        >>> bb = create_backbone("vit_tiny", depth=2).eval()
        >>> out = bb(torch.randn(2, 3, 96, 64))
        >>> out.pooled.shape, out.tokens.shape, out.grid
        (torch.Size([2, 192]), torch.Size([2, 24, 192]), (6, 4))
    """

    def __init__(self, model: nn.Module, *, name: str | None = None, pooling: str | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.name = name or type(model).__name__
        self.family = _detect_family(model)
        self.embed_dim = int(model.num_features)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0)) if self.family == "vit" else 0
        self.in_chans = int(getattr(model, "in_chans", 3))
        if self.family == "cnn":
            self.patch_size = (1, 1)
        else:
            self.patch_size = _pair(model.patch_embed.patch_size)
            # ViTs with dynamic_img_pad accept any size (the last patch row/column is padded).
            if getattr(model.patch_embed, "dynamic_img_pad", False):
                self.patch_size = (1, 1)
        has_cls = self.family == "vit" and bool(getattr(model, "has_class_token", True))
        if pooling is None:
            pooling = "cls" if has_cls else "mean"
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        if pooling == "cls" and not has_cls:
            raise ValueError(
                f"pooling='cls' needs a ViT with a class token; {self.name} (family {self.family!r}) has none"
            )
        self.pooling = pooling
        self.load_report = None

    @property
    def numerics(self) -> str:
        """``"esvit"`` / ``"dino"`` when the model computes that reference's numerics, else ``"timm"``."""
        from .numerics import DINOVisionTransformer, EsViTSwinBlock

        if isinstance(self.model, DINOVisionTransformer):
            return "dino"
        if self.family == "swin" and any(isinstance(m, EsViTSwinBlock) for m in self.model.modules()):
            return "esvit"
        return "timm"

    def set_numerics(self, numerics: str) -> Backbone:
        """Switch (in place) from timm's numerics to ``"esvit"`` (Swin) or ``"dino"`` (ViT); returns self.

        Raises:
            ValueError: an unknown value, a family the numerics do not apply to, or a backbone that
                already computes other non-timm numerics.

        Example:
            >>> from cmd.backbones import create_backbone
            >>> create_backbone("vit_tiny", depth=1).set_numerics("dino").numerics
            'dino'
        """
        from .numerics import apply_numerics

        current = self.numerics
        if numerics == current:
            return self
        if current != "timm":
            raise ValueError(f"{self.name} already computes {current!r} numerics; build a new backbone for {numerics!r}")
        apply_numerics(self.model, numerics)
        return self

    def extra_repr(self) -> str:
        text = f"name={self.name!r}, family={self.family!r}, embed_dim={self.embed_dim}, pooling={self.pooling!r}"
        numerics = self.numerics
        return text + (f", numerics={numerics!r}" if numerics != "timm" else "")

    # ------------------------------------------------------------------ input checks
    def _check_input(self, x: torch.Tensor, what: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{what} must be a torch.Tensor [B, {self.in_chans}, H, W], got {type(x).__name__}"
            )
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{what} must have shape [B, {self.in_chans}, H, W], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(
                f"{what} has dtype {x.dtype}; the backbone takes float images: convert uint8 images with "
                "x.float() / 255 and normalise them (cmd.eval_transform / the training transforms do both)"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{what} is an empty batch (shape {list(x.shape)}): pass at least one image")
        ph, pw = self.patch_size
        h, w = x.shape[-2:]
        if h % ph or w % pw:
            raise ValueError(
                f"{what} has size {h}x{w}, but {self.name} ({self.family}) needs height and width that are "
                f"multiples of its patch size {ph}x{pw}"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> BackboneOutput:
        """Image vector and region tokens of one batch of same-size crops.

        Args:
            x: [B, 3, H, W] images; H and W multiples of ``patch_size``.

        Returns:
            ``BackboneOutput(pooled [B, D], tokens [B, N, D], grid (h, w))`` with ``N = h * w``.
            ``tokens`` is a view into the model output (no copy); for CNNs it is a transposed view
            of the NCHW feature map, so use ``reshape`` rather than ``view`` on it.
        """
        self._check_input(x)
        if self.family == "vit":
            return self._forward_vit(x)
        if self.family == "swin":
            return self._forward_swin(x)
        return self._forward_cnn(x)

    def _forward_vit(self, x: torch.Tensor) -> BackboneOutput:
        h, w = x.shape[-2:]
        grid = tuple(int(g) for g in self.model.patch_embed.dynamic_feat_size((h, w)))
        y = self.model.forward_features(x)  # [B, prefix + N, D], final norm applied
        tokens = y[:, self.num_prefix_tokens :]
        if self.pooling == "cls":
            pooled = y[:, 0]
        else:
            fc_norm = getattr(self.model, "fc_norm", None)
            pooled = tokens.mean(dim=1)
            if fc_norm is not None:
                pooled = fc_norm(pooled)
        return BackboneOutput(pooled=pooled, tokens=tokens, grid=grid)

    def _spatial(self, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, N, D] tokens and (h, w) from a 4-D feature map in the model's ``output_fmt``."""
        fmt = getattr(self.model, "output_fmt", "NCHW")
        fmt = getattr(fmt, "value", fmt)  # timm's Format enum or a string
        if y.ndim != 4:
            raise TypeError(
                f"{self.name}: forward_features returned shape {list(y.shape)}, expected a 4-D feature map"
            )
        if str(fmt) == "NHWC":
            grid = (int(y.shape[1]), int(y.shape[2]))
            return y.flatten(1, 2), grid
        grid = (int(y.shape[2]), int(y.shape[3]))
        return y.flatten(2).transpose(1, 2), grid

    def _forward_swin(self, x: torch.Tensor) -> BackboneOutput:
        tokens, grid = self._spatial(self.model.forward_features(x))  # final norm applied
        return BackboneOutput(pooled=tokens.mean(dim=1), tokens=tokens, grid=grid)

    def _forward_cnn(self, x: torch.Tensor) -> BackboneOutput:
        tokens, grid = self._spatial(self.model.forward_features(x))
        return BackboneOutput(pooled=tokens.mean(dim=1), tokens=tokens, grid=grid)

    # ------------------------------------------------------------------ multi-crop
    def forward_multicrop(
        self, crops: Sequence[torch.Tensor], *, per_crop: bool = False
    ) -> list[BackboneOutput]:
        """Forward a multi-crop list, one pass per run of consecutive same-size crops.

        Consecutive crops of the same height and width are concatenated along the batch and go
        through the model together (DINO's multi-crop batching), so ``[2 x 224, 8 x 96]`` costs two
        forward passes.

        Args:
            crops: V tensors ``[B, 3, H_v, W_v]``, all with the same B.
            per_crop: if False (default), one output per *resolution group*, stacked crop-major:
                rows ``[c * B, (c + 1) * B)`` of a group hold its c-th crop, so a group of C crops has
                ``pooled [C * B, D]`` and ``tokens [C * B, N, D]``. If True, one output per crop
                (``len == V``, views of the group outputs), in input order.

        Returns:
            A list of `BackboneOutput`, groups (or crops) in input order.

        Example:
            >>> import torch
            >>> from cmd.backbones import create_backbone
            >>> bb = create_backbone("vit_tiny", depth=1).eval()
            >>> crops = [torch.randn(2, 3, 64, 64)] * 2 + [torch.randn(2, 3, 32, 32)] * 3
            >>> [o.tokens.shape[:2] for o in bb.forward_multicrop(crops)]
            [torch.Size([4, 16]), torch.Size([6, 4])]
            >>> len(bb.forward_multicrop(crops, per_crop=True))
            5
        """
        if isinstance(crops, torch.Tensor) or len(crops) == 0:
            raise ValueError("crops must be a non-empty sequence of [B, 3, H, W] tensors")
        for i, c in enumerate(crops):
            self._check_input(c, what=f"crops[{i}]")
        b = crops[0].shape[0]
        for i, c in enumerate(crops):
            if c.shape[0] != b:
                raise ValueError(
                    f"all crops must have the same batch size B; crops[0] has {b}, crops[{i}] has {c.shape[0]}"
                )
        groups = self.resolution_groups(crops)
        outputs = []
        for start, end in groups:
            x = crops[start] if end - start == 1 else torch.cat(list(crops[start:end]), dim=0)
            out = self(x)
            if per_crop:
                outputs.extend(self.split_output(out, end - start))
            else:
                outputs.append(out)
        return outputs

    @staticmethod
    def resolution_groups(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
        """``[start, end)`` index ranges of consecutive crops with the same spatial size.

        Example:
            >>> import torch
            >>> Backbone.resolution_groups([torch.zeros(1, 3, 8, 8)] * 2 + [torch.zeros(1, 3, 4, 4)])
            [(0, 2), (2, 3)]
        """
        groups: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(crops) + 1):
            if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
                groups.append((start, i))
                start = i
        return groups

    @staticmethod
    def split_output(output: BackboneOutput, n_crops: int) -> list[BackboneOutput]:
        """Split a crop-major group output ``[C * B, ...]`` into C per-crop outputs ``[B, ...]`` (views).

        Example:
            >>> import torch
            >>> out = BackboneOutput(torch.zeros(6, 4), torch.zeros(6, 9, 4), (3, 3))
            >>> [o.batch_size for o in Backbone.split_output(out, 3)]
            [2, 2, 2]
        """
        rows = output.pooled.shape[0]
        if n_crops <= 0 or rows % n_crops:
            raise ValueError(f"cannot split an output of {rows} rows into n_crops={n_crops} equal crops")
        b = rows // n_crops
        return [
            BackboneOutput(pooled=p, tokens=t, grid=output.grid)
            for p, t in zip(output.pooled.split(b), output.tokens.split(b))
        ]

    # ------------------------------------------------------------------ linear-probe features
    def forward_last_blocks(
        self, x: torch.Tensor, n: int = 4, avgpool: bool = False, avgpool_layout: str = "concat"
    ) -> torch.Tensor:
        """Concatenated features of the last ``n`` blocks (stages for CNNs), for linear probing.

        Swin: mean token of each of the last n blocks, the final norm applied to blocks of the last
        stage. ViT: CLS token of each of the last n blocks after the final norm (mean patch token for
        ViTs without a class token); with ``avgpool=True`` the mean patch token of the last block
        (after the norm) is appended. CNN: global average of each of the last n stages as timm's
        ``feature_info`` lists them (ResNet: stem, layer1..layer4). See the module table for sizes.

        Args:
            x: [B, 3, H, W] images.
            n: how many blocks; ``n=1`` gives ``pooled`` (ViT with ``pooling="cls"``, Swin, CNN).
            avgpool: ViT only: append the mean patch token of the last block.
            avgpool_layout: with ``avgpool=True``: ``"concat"`` gives ``[cls, mean]`` (this library's
                layout, any n); ``"dino"`` gives DINO's ``eval_linear.py`` layout, CLS and mean-patch
                features interleaved channel by channel ``[cls_0, mean_0, cls_1, mean_1, ...]``
                (DINO only supports it with n=1, e.g. its ViT-B linear heads), so DINO's released
                linear classifiers apply to these features unchanged.

        Returns:
            [B, F] features, blocks in network order.

        Example:
            >>> import torch
            >>> from cmd.backbones import create_backbone
            >>> bb = create_backbone("vit_tiny", depth=4).eval()
            >>> bb.forward_last_blocks(torch.randn(2, 3, 32, 32), n=4, avgpool=True).shape
            torch.Size([2, 960])
        """
        self._check_input(x)
        total = self.num_blocks
        if not isinstance(n, int) or not 1 <= n <= total:
            raise ValueError(f"n must be an int in [1, {total}] for {self.name}, got {n!r}")
        if avgpool and self.family != "vit":
            raise ValueError(
                f"avgpool=True is for ViTs (it appends the mean patch token); {self.name} is {self.family}"
            )
        if avgpool_layout not in ("concat", "dino"):
            raise ValueError(f"avgpool_layout must be 'concat' or 'dino', got {avgpool_layout!r}")
        if avgpool_layout == "dino" and avgpool and n != 1:
            raise ValueError(
                "avgpool_layout='dino' interleaves the CLS and mean-patch features of one block, as DINO's "
                f"eval_linear.py does (it supports only n_last_blocks=1 with avgpool); got n={n}"
            )
        if self.family == "vit":
            feats = self._last_blocks_vit(x, n, avgpool)
            if avgpool and avgpool_layout == "dino":
                d = feats.shape[-1] // 2
                feats = torch.stack((feats[:, :d], feats[:, d:]), dim=-1).flatten(1)
            return feats
        if self.family == "swin":
            return self._last_blocks_swin(x, n)
        return self._last_blocks_cnn(x, n)

    @property
    def num_blocks(self) -> int:
        """How many blocks (ViT, Swin) or feature stages (CNN) `forward_last_blocks` can take."""
        if self.family == "vit":
            return len(self.model.blocks)
        if self.family == "swin":
            return sum(len(stage.blocks) for stage in self.model.layers)
        return len(self.model.feature_info)

    def _last_blocks_vit(self, x: torch.Tensor, n: int, avgpool: bool) -> torch.Tensor:
        inter = self.model.forward_intermediates(
            x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        if self.num_prefix_tokens == 0:
            patches = list(inter)
            feats = [p.mean(dim=1) for p in patches]
        else:
            patches = [p for p, _ in inter]
            if self.pooling == "cls":
                feats = [prefix[:, 0] for _, prefix in inter]
            else:
                feats = [p.mean(dim=1) for p in patches]
        if avgpool:
            feats.append(patches[-1].mean(dim=1))
        return torch.cat(feats, dim=-1)

    def _last_blocks_swin(self, x: torch.Tensor, n: int) -> torch.Tensor:
        m = self.model
        first = self.num_blocks - n
        last_stage = len(m.layers) - 1
        feats = []
        index = 0
        x = m.patch_embed(x)
        for s, stage in enumerate(m.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)  # [B, h, w, C]
                if index >= first:
                    y = m.norm(x) if s == last_stage else x
                    feats.append(y.flatten(1, 2).mean(dim=1))  # same reduction as forward()
                index += 1
        return torch.cat(feats, dim=-1)

    def _last_blocks_cnn(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if not hasattr(self.model, "forward_intermediates"):
            raise NotImplementedError(
                f"{self.name} has no forward_intermediates; forward_last_blocks needs it"
            )
        maps = self.model.forward_intermediates(x, indices=n, intermediates_only=True)
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], dim=-1)
