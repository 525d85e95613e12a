"""cmd: Cross-level Multi-instance Distillation (CMD) for self-supervised fine-grained categorization.

The public API is re-exported lazily: ``import cmd`` imports neither torch nor any submodule; a
name such as ``cmd.CMDLoss`` imports its module on first access.

The package shares its import name with the standard library's ``cmd`` module, so the stdlib's public
API (``Cmd``, ``PROMPT``, ``IDENTCHARS``) is re-exported first, loaded from the stdlib's own file:
``pdb``, ``breakpoint()`` and any program doing ``import cmd; cmd.Cmd`` keep working.

Example:
    >>> import cmd
    >>> loss = cmd.CMDLoss.from_preset("cmd", out_dim=4096)  # doctest: +SKIP
"""

# The stdlib API is bound before anything else (pdb imports this module on its import path).
from ._stdlib_compat import IDENTCHARS, PROMPT, Cmd  # noqa: I001
from ._version import __version__

import importlib as _importlib

_TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (keeps `import cmd` cheap)

# public name -> module that defines it (relative to this package)
_LAZY_ATTRS: dict[str, str] = {
    # backbones
    "Backbone": "backbones",
    "BackboneOutput": "backbones",
    "create_backbone": "backbones",
    "load_checkpoint": "backbones",
    "load_pretrained": "backbones",
    "export_checkpoint": "backbones",
    "LoadReport": "backbones",
    # pooling, heads, network
    "MultiInstancePooling": "pooling",
    "DINOHead": "heads",
    "CrossLevelHead": "heads",
    "CrossLevelOutput": "heads",
    "cancel_last_layer_gradients": "heads",
    "CMDNetwork": "network",
    # losses
    "DINOLoss": "losses",
    "CMDLoss": "losses",
    "CMDLossOutput": "losses",
    "Center": "losses",
    "sinkhorn_knopp": "losses",
    "koleo": "losses",
    "diagnose_collapse": "losses",
    # label-free diagnostics
    "rankme": "diagnostics",
    "EmbeddingReservoir": "diagnostics",
    # training essentials
    "EMATeacher": "teacher",
    "update_teacher": "teacher",
    "cosine_schedule": "schedules",
    "teacher_temperature_schedule": "schedules",
    "scale_lr": "schedules",
    "MultiCropAugmentation": "transforms",
    "eval_transform": "transforms",
    "multicrop_collate": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "param_groups": "optim",
    "set_schedules": "optim",
    "clip_gradients": "optim",
    "MixedPrecision": "amp",
    "mixed_precision": "amp",
    "save_checkpoint": "checkpoint",
    "restore_checkpoint": "checkpoint",
    # data
    "SyntheticFineGrained": "data",
    "SyntheticBroad": "data",
    "CUB200": "data",
    "build_dataset": "data",
    # evaluation
    "extract_features": "eval",
    "KNNClassifier": "eval",
    "retrieval_metrics": "eval",
    "fine_grained_retrieval_split": "eval",
    "LinearProbe": "eval",
    "train_linear_probe": "eval",
    "part_weight_mass": "eval",
    "pointing_game": "eval",
    "top_k_part_iou": "eval",
    "train_supervised": "eval",
    # a loop that trains as the program does (cmd.training.build_* read a config / recipe)
    "SeededMultiCrop": "training",
    "EpochIndexSampler": "training",
}

_SUBMODULES = (
    "backbones",
    "pooling",
    "heads",
    "network",
    "losses",
    "diagnostics",
    "teacher",
    "schedules",
    "transforms",
    "optim",
    "amp",
    "checkpoint",
    "distributed",
    "data",
    "eval",
    "viz",
    "training",
    "recipes",
)

_STDLIB_ALL = ["Cmd", "PROMPT", "IDENTCHARS"]

__all__ = [*_STDLIB_ALL, "__version__", *_LAZY_ATTRS, *_SUBMODULES]


def __getattr__(name: str):
    module_name = _LAZY_ATTRS.get(name)
    if module_name is not None:
        module = _importlib.import_module(f"{__name__}.{module_name}")
        value = getattr(module, name)
        globals()[name] = value  # cache: the next access is a plain attribute lookup
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if _TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from cmd.amp import MixedPrecision, mixed_precision
    from cmd.backbones import (
        Backbone,
        BackboneOutput,
        LoadReport,
        create_backbone,
        export_checkpoint,
        load_checkpoint,
        load_pretrained,
    )
    from cmd.checkpoint import restore_checkpoint, save_checkpoint
    from cmd.data import CUB200, SyntheticBroad, SyntheticFineGrained, build_dataset
    from cmd.diagnostics import EmbeddingReservoir, rankme
    from cmd.eval import (
        KNNClassifier,
        LinearProbe,
        extract_features,
        fine_grained_retrieval_split,
        part_weight_mass,
        pointing_game,
        retrieval_metrics,
        top_k_part_iou,
        train_linear_probe,
        train_supervised,
    )
    from cmd.heads import CrossLevelHead, CrossLevelOutput, DINOHead, cancel_last_layer_gradients
    from cmd.losses import Center, CMDLoss, CMDLossOutput, DINOLoss, diagnose_collapse, koleo, sinkhorn_knopp
    from cmd.network import CMDNetwork
    from cmd.optim import clip_gradients, param_groups, set_schedules
    from cmd.pooling import MultiInstancePooling
    from cmd.schedules import cosine_schedule, scale_lr, teacher_temperature_schedule
    from cmd.teacher import EMATeacher, update_teacher
    from cmd.training import EpochIndexSampler, SeededMultiCrop
    from cmd.transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        MultiCropAugmentation,
        eval_transform,
        multicrop_collate,
    )
