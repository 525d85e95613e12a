"""Load a cmd-fgvc training checkpoint in one call: the backbone as trained, for downstream work.

A checkpoint written by ``cmd-fgvc pretrain`` (or by `cmd.save_checkpoint` with ``args=``) stores
the options it was trained with: the architecture (``args["arch"]``), the timm keyword arguments of
the backbone (``args["backbone_kwargs"]``, e.g. a narrow ResNet's ``channels``) and its numerics
(``backbone_numerics``). `load_pretrained` reads them, builds that backbone and loads the teacher
(or the student) into it, so no architecture option is repeated.

Example:
    >>> import tempfile, pathlib, torch, cmd
    >>> bb = cmd.create_backbone("vit_tiny", depth=1, patch_size=8, embed_dim=24, num_heads=2)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pth"
    >>> _ = cmd.save_checkpoint(path, teacher=bb.state_dict(), args={"arch": "vit_tiny",
    ...     "backbone_kwargs": {"depth": 1, "patch_size": 8, "embed_dim": 24, "num_heads": 2}})
    >>> loaded = load_pretrained(path)
    >>> loaded.embed_dim, loaded.training
    (24, False)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .backbone import Backbone
from .checkpoints import read_checkpoint_file

__all__ = ["load_pretrained", "training_args"]


def training_args(checkpoint: str | os.PathLike[str] | Mapping[str, Any], *, trust_pickle: bool = False
                  ) -> dict[str, Any] | None:
    """The training options stored in a cmd-fgvc checkpoint (a path or its loaded dict), or None.

    None when the checkpoint is not a cmd-fgvc training checkpoint (no ``args`` with an ``arch``:
    DINO, EsViT, timm weights, a bare state dict) or cannot be read.
    """
    content = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            content = read_checkpoint_file(checkpoint, trust_pickle=trust_pickle)
        except (OSError, RuntimeError, ValueError):
            return None
    stored = content.get("args") if isinstance(content, Mapping) else None
    if not isinstance(stored, Mapping) or not stored.get("arch"):
        return None
    return dict(stored)


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    key: str = "teacher",
    strict: bool = True,
    trust_pickle: bool = False,
) -> Backbone:
    """The backbone of a cmd-fgvc training checkpoint, built and loaded as it was trained, in eval mode.

    The architecture, its keyword arguments and the numerics are read from the checkpoint (its
    stored training options and ``backbone_numerics``); nothing about the architecture is passed.
    For DINO, EsViT/CMD or timm weights (which do not store their options) use
    ``cmd.create_backbone(name, checkpoint=path, **kwargs)``.

    Args:
        path: a checkpoint written by ``cmd-fgvc pretrain`` (``output_dir/checkpoint.pth``) or by
            `cmd.save_checkpoint` with ``args={"arch": ..., "backbone_kwargs": {...}}``.
        key: which network to take: ``"teacher"`` (the EMA teacher, the one the k-NN monitor and
            ``cmd-fgvc evaluate`` use) or ``"student"``.
        strict: refuse a checkpoint whose backbone weights do not fill the backbone exactly (the
            heads are always left aside).
        trust_pickle: read the file with ``weights_only=False`` (trusted files only).

    Returns:
        A `Backbone` in eval mode (``backbone(images)`` -> `BackboneOutput`: ``pooled [B, D]``,
        ``tokens [B, N, D]``); ``backbone.load_report`` says what was loaded and which numerics.

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``key`` is not "teacher" or "student", the file is not a cmd-fgvc training
            checkpoint (the message says to use `cmd.create_backbone`), or (strict) it does not fit.

    Example:
        >>> import cmd  # doctest: +SKIP
        >>> backbone = cmd.load_pretrained("outputs/pretrain_demo/checkpoint.pth")  # doctest: +SKIP
        >>> features = backbone(images).pooled  # [B, D]  # doctest: +SKIP
    """
    if key not in ("teacher", "student"):
        raise ValueError(f"key must be 'teacher' or 'student', got {key!r}")
    content = read_checkpoint_file(path, trust_pickle=trust_pickle)
    stored = training_args(content)
    if stored is None:
        raise ValueError(
            f"{os.fspath(path)} is not a cmd-fgvc training checkpoint (it stores no training options 'args' with "
            "an 'arch'): for DINO, EsViT/CMD or timm weights use cmd.create_backbone(name, checkpoint=path, "
            "**architecture_kwargs)"
        )
    if not isinstance(content, Mapping) or key not in content:
        raise ValueError(f"{os.fspath(path)} holds no {key!r} network (keys: {sorted(content)})")
    from .factory import create_backbone

    kwargs = stored.get("backbone_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{os.fspath(path)}: its stored backbone_kwargs is not a dict: {kwargs!r}")
    backbone = create_backbone(str(stored["arch"]), checkpoint=content, checkpoint_key=key, strict=strict,
                               **dict(kwargs))
    return backbone.eval()
