"""`create_backbone`: build a `Backbone` from a timm model name, an alias, or a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .backbone import Backbone

__all__ = ["ALIASES", "create_backbone", "resolve_model_name"]

#: Short names used by the example scripts (and the seed's command line) -> timm model names.
ALIASES: dict[str, str] = {
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "resnet50": "resnet50",
}

# timm modules whose models take `dynamic_img_size=True` / `strict_img_size=False` so that one model
# accepts every crop size of a multi-crop recipe.
_DYNAMIC_SIZE_MODULES = ("vision_transformer", "deit", "eva")
_NON_STRICT_SIZE_MODULES = ("swin_transformer", "swin_transformer_v2")


def resolve_model_name(name: str) -> str:
    """The timm model name for ``name`` (an alias or a timm name, with or without a pretrained tag).

    Example:
        >>> resolve_model_name("swin_tiny")
        'swin_tiny_patch4_window7_224'
    """
    import timm

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    resolved = ALIASES.get(name, name)
    if not timm.is_model(resolved):
        raise ValueError(
            f"unknown backbone {name!r}: not an alias ({', '.join(sorted(ALIASES))}) nor a timm model "
            "(see timm.list_models())"
        )
    return resolved


def _size_kwargs(timm_name: str) -> dict[str, Any]:
    from timm.models import model_entrypoint

    module = model_entrypoint(timm_name).__module__.rsplit(".", 1)[-1]
    if module in _DYNAMIC_SIZE_MODULES:
        return {"dynamic_img_size": True}
    if module in _NON_STRICT_SIZE_MODULES:
        return {"strict_img_size": False}
    return {}


def create_backbone(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    checkpoint_key: str = "teacher",
    pooling: str | None = None,
    numerics: str | None = None,
    strict: bool = True,
    trust_pickle: bool = False,
    **timm_kwargs: Any,
) -> Backbone:
    """Create a `Backbone` from a timm model name or a short alias.

    The timm model is created headless (``num_classes=0``) and size-agnostic: ViT-family models with
    ``dynamic_img_size=True``, Swin with ``strict_img_size=False`` (explicit ``timm_kwargs`` win).

    Args:
        name: an alias (``swin_tiny``, ``swin_small``, ``swin_base``, ``vit_tiny``, ``vit_small``,
            ``vit_base``, ``resnet50``) or any timm name of a ViT (``vit_*``, ``deit_*``, with
            registers too), Swin (``swin_*``; EsViT's Swin-T W14 is ``swin_tiny`` with
            ``window_size=14``) or CNN with a spatial last feature map (``resnet*``, ``convnext_*``).
        pretrained: load timm's pretrained weights (needs network or a filled Hugging Face cache).
        checkpoint: a path or a state dict loaded with `load_checkpoint`: this library's
            checkpoints, DINO, EsViT/CMD Swin, or timm state dicts. Its `LoadReport` (with the numerics
            chosen and why) is ``backbone.load_report``.
        checkpoint_key: which network of a training checkpoint to take (``"teacher"`` or ``"student"``).
        pooling: ``"cls"`` or ``"mean"`` for ViTs (see `Backbone`).
        numerics: whose forward pass to reproduce: ``"timm"``, ``"esvit"`` (Swin: EsViT/CMD's LayerNorm
            eps 1e-6 and pad-then-shift windows) or ``"dino"`` (ViT: DINO's position-embedding
            interpolation); see `cmd.backbones.numerics`. ``None`` (default): ``"timm"``, or with a
            ``checkpoint`` the numerics of its format (EsViT/CMD Swin -> ``"esvit"``, DINO ViT ->
            ``"dino"``, a cmd-fgvc checkpoint's or wrapped export's stored ``backbone_numerics``;
            a stored value that is not a known one raises). An explicit value wins.
        strict: refuse a checkpoint that does not fill the backbone exactly (heads aside); with False,
            load what fits (see ``backbone.load_report``).
        trust_pickle: read the checkpoint file with ``weights_only=False`` (warns; trusted files only).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``window_size=14``, ``drop_path_rate=0.1``,
            ``img_size=...``, or small test configs such as ``depth=2``).

    Returns:
        The `Backbone` (in training mode, as timm returns it).

    Raises:
        ValueError: unknown name or numerics, both ``pretrained`` and ``checkpoint``, or (strict) a
            checkpoint that does not fit; the message gives the counts and the first keys.
        RuntimeError: ``pretrained=True`` and the weights cannot be fetched.

    Example:
        >>> bb = create_backbone("swin_tiny", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
        >>> bb.family, bb.embed_dim, bb.numerics
        ('swin', 192, 'timm')
        >>> from cmd.backbones import export_checkpoint
        >>> esvit = export_checkpoint(bb.set_numerics("esvit"), layout="esvit")  # EsViT's layout
        >>> create_backbone("swin_tiny", embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
        ...                 checkpoint=esvit).numerics
        'esvit'
    """
    import timm

    from .numerics import NUMERICS

    timm_name = resolve_model_name(name)
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    if numerics is not None and numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS} or None, got {numerics!r}")
    kwargs: dict[str, Any] = {"num_classes": 0, **_size_kwargs(timm_name)}
    kwargs.update(timm_kwargs)
    if pretrained:
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise RuntimeError(
                f"could not load timm's pretrained weights for {timm_name!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Without network access or a cached copy, "
                f"create the model with pretrained=False and pass checkpoint='path/to/weights.pth' "
                f"(DINO, EsViT/CMD, timm or cmd-fgvc checkpoints are recognised)."
            ) from err
    else:
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    backbone = Backbone(model, name=timm_name, pooling=pooling)
    if checkpoint is None:
        backbone.set_numerics(numerics or "timm")
        return backbone
    from .checkpoints import _load

    try:
        report, bad_numerics = _load(backbone, checkpoint, checkpoint_key, strict, trust_pickle)
    except ValueError as err:  # a cmd-fgvc checkpoint stores its architecture: say how to load it in one call
        from .pretrained import training_args

        stored = training_args(checkpoint, trust_pickle=trust_pickle)
        if stored is None:
            raise
        kwargs_text = ", ".join(f"{k}={v!r}" for k, v in (stored.get("backbone_kwargs") or {}).items())
        raise ValueError(
            f"{str(err).rstrip('.')}. This is a cmd-fgvc training checkpoint of {stored['arch']!r}"
            + (f" with {kwargs_text}" if kwargs_text else "")
            + ": load it in one call with cmd.load_pretrained(path), which reads these from the checkpoint"
            + (f", or pass them: create_backbone({stored['arch']!r}, checkpoint=path, {kwargs_text})" if kwargs_text
               else "")
        ) from err
    if numerics is not None:
        stored = "stored" in report.numerics_source
        source = report.numerics_source if stored else "the checkpoint format"
        reason = "explicit" + (
            f"; {source} suggests {report.suggested_numerics!r}"
            if report.implied_numerics is not None and report.suggested_numerics != numerics else ""
        )
        if bad_numerics is not None:
            reason += f"; {bad_numerics}"
    elif bad_numerics is not None:
        raise ValueError(
            f"{bad_numerics}: cannot choose the backbone's numerics; pass numerics='timm', 'esvit' or 'dino' "
            "(the command line: --backbone_kwargs '{\"numerics\": ...}')"
        )
    else:
        numerics = report.suggested_numerics
        source = report.numerics_source if report.implied_numerics is not None else (
            f"the checkpoint format {report.source_format!r}")
        reason = f"chosen from {source}; pass numerics= to override"
    backbone.set_numerics(numerics)
    report.numerics, report.numerics_reason = numerics, reason
    backbone.load_report = report
    return backbone
