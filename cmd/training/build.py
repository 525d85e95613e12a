"""Builders that turn a training config into the blocks ``cmd-fgvc pretrain`` trains with.

A config is any object with the option names of ``cmd-fgvc pretrain`` as attributes: a recipe of
`cmd.recipes` (``cmd.recipes.get("demo")``), the program's parsed options, or your own dataclass /
``types.SimpleNamespace``. Each builder reads only the attributes it needs (listed in its
docstring). Built from the same config and seed, these blocks train exactly as the program does:
the same initial weights, data order, crops, loss, optimiser and per-step schedules.

Example:
    >>> import cmd, torch
    >>> cfg = cmd.recipes.get("demo")  # doctest: +SKIP
    >>> data = cmd.SyntheticFineGrained(n_classes=10, n_per_class=100, image_size=32, difficulty="demo")  # doctest: +SKIP
    >>> loader = build_train_loader(cfg, data, seed=0)  # doctest: +SKIP
    >>> loss = build_loss(cfg)  # doctest: +SKIP
    >>> torch.manual_seed(cfg.seed)  # doctest: +SKIP
    >>> student = build_network(cfg, outputs=loss.student_outputs)  # doctest: +SKIP
    >>> ema = build_teacher(cfg, student, total_steps=cfg.epochs * 31)  # doctest: +SKIP
    >>> optimizer = build_optimizer(cfg, student)  # doctest: +SKIP
    >>> lr, wd = build_schedules(cfg, iters_per_epoch=31)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from cmd.backbones import create_backbone
from cmd.heads import CrossLevelHead
from cmd.losses import CMDLoss
from cmd.network import CMDNetwork
from cmd.optim import param_groups
from cmd.schedules import cosine_schedule, scale_lr
from cmd.teacher import EMATeacher
from cmd.training.data import EpochIndexSampler, SeededMultiCrop
from cmd.transforms import MultiCropAugmentation, multicrop_collate

__all__ = [
    "Schedules",
    "build_data",
    "build_loss",
    "build_multicrop",
    "build_network",
    "build_optimizer",
    "build_schedules",
    "build_teacher",
    "build_train_loader",
]

N_GLOBAL_CROPS = 2  # DINO / EsViT / CMD: two global crops, the teacher's inputs


# ------------------------------------------------------------------------------------------ data


def build_data(cfg: Any, split: str, transform: Callable[[Any], Any] | None = None, **synthetic: Any) -> Dataset:
    """The ``split`` of the config's dataset: ``cfg.dataset`` with ``cfg.data_path``, or the synthetic set.

    ``cfg`` holds the data options of ``cmd-fgvc pretrain`` (its parsed options do; a recipe of
    `cmd.recipes` holds the method only: build the dataset directly, e.g. `cmd.SyntheticFineGrained`).
    Reads ``dataset``, ``data_path``, and for ``dataset == "synthetic"`` ``synthetic_classes``,
    ``synthetic_per_class``, ``synthetic_image_size``, ``seed`` (and, when present,
    ``synthetic_difficulty``, ``synthetic_class_hue``, ``synthetic_clutter``). ``synthetic`` goes
    to `cmd.SyntheticFineGrained` (e.g. ``return_part_mask=True``); ``synthetic_difficulty == "broad"``
    builds `cmd.SyntheticBroad` instead (``synthetic_classes`` over four scene kinds: the broad data of a
    two-stage protocol's first stage). ``dataset == "digits"`` is
    `cmd.data.Digits` at 32 px, its stratified split drawn by ``seed`` (no ``data_path``).

    Returns:
        a dataset of ``(image, label)`` (``transform(image)`` when a transform is given).

    Raises:
        ValueError: a file-based dataset without ``data_path``, or a malformed folder.
        FileNotFoundError: the split does not exist under ``data_path``.
    """
    from cmd.data import Digits, SyntheticBroad, SyntheticFineGrained, build_dataset

    if cfg.dataset == "synthetic" and getattr(cfg, "synthetic_difficulty", None) == "broad":
        overrides = [name for name in ("synthetic_class_hue", "synthetic_clutter") if getattr(cfg, name, None) is not None]
        if overrides:
            raise ValueError(f"synthetic_difficulty 'broad' mixes four preset scene kinds; it takes no {overrides}")
        return SyntheticBroad(n_classes=cfg.synthetic_classes, n_per_class=cfg.synthetic_per_class,
                              image_size=cfg.synthetic_image_size, split=split, seed=cfg.seed, transform=transform,
                              **synthetic)
    if cfg.dataset == "synthetic":
        return SyntheticFineGrained(
            n_classes=cfg.synthetic_classes, n_per_class=cfg.synthetic_per_class,
            image_size=cfg.synthetic_image_size, split=split, seed=cfg.seed, transform=transform,
            difficulty=getattr(cfg, "synthetic_difficulty", "hard"),
            class_hue=getattr(cfg, "synthetic_class_hue", None), clutter=getattr(cfg, "synthetic_clutter", None),
            **synthetic,
        )
    if cfg.dataset == "digits":
        if synthetic:
            raise TypeError(f"the digits dataset takes no {sorted(synthetic)} (synthetic data only)")
        return Digits(split=split, seed=cfg.seed, transform=transform)
    if cfg.data_path is None:
        raise ValueError(f"data_path is required for dataset {cfg.dataset!r}")
    return build_dataset(cfg.dataset, cfg.data_path, split, transform)


def build_multicrop(cfg: Any, *, n_global: int = N_GLOBAL_CROPS, n_local: int | None = None) -> MultiCropAugmentation:
    """DINO's multi-crop augmentation: 2 global crops and ``cfg.local_crops_number`` local crops.

    Reads ``global_size``, ``local_size``, ``local_crops_number``, ``global_crops_scale``,
    ``local_crops_scale`` and, when present, ``color_jitter``, ``blur_sigma`` and
    ``solarization_prob`` (DINO's values when absent). The result maps an image to a list of
    ``n_global + n_local`` tensors ``[3, H, W]``; ``n_global=1, n_local=0`` gives the first global
    crop alone (the supervised reference's augmentation).
    """
    photometric = {name: getattr(cfg, name) for name in ("color_jitter", "blur_sigma", "solarization_prob")
                   if getattr(cfg, name, None) is not None}
    return MultiCropAugmentation(
        global_size=cfg.global_size, local_size=cfg.local_size, n_global=n_global,
        n_local=cfg.local_crops_number if n_local is None else n_local, global_scale=tuple(cfg.global_crops_scale),
        local_scale=tuple(cfg.local_crops_scale), **photometric,
    )


def build_train_loader(
    cfg: Any,
    dataset: Dataset,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """The program's training loader: seeded multi-crop views in a resumable, per-epoch order.

    ``dataset`` (``(image, label)`` samples, e.g. `cmd.SyntheticFineGrained` or `build_data`) is
    wrapped in `SeededMultiCrop` with `build_multicrop` and ``seed``; its order comes from a
    `DistributedSampler` (``shuffle``, ``seed``, ``drop_last``) behind an `EpochIndexSampler`
    (``loader.sampler``) that yields whole batches of ``cfg.batch_size_per_gpu`` per epoch. Select
    the epochs with ``loader.sampler.set_epochs(start, stop, skip)`` before iterating; one iteration
    then spans them all (workers and prefetching stay alive across the epoch boundaries; split it
    with `epoch_batches`, ``len(loader) // (stop - start)`` batches per whole epoch). Batches are
    lists of ``2 + L`` crop tensors ``[B, 3, H, W]`` (`cmd.multicrop_collate`) and labels ``[B]``.

    Reads ``batch_size_per_gpu`` and what `build_multicrop` reads.

    Raises:
        ValueError: the dataset is smaller than one batch per process.
    """
    train_set = SeededMultiCrop(dataset, build_multicrop(cfg), seed)
    base = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                              drop_last=True)
    if len(base) < cfg.batch_size_per_gpu:
        raise ValueError(
            f"the training set ({len(train_set)} images over {world_size} processes) is smaller than one batch "
            f"of batch_size_per_gpu={cfg.batch_size_per_gpu}"
        )
    return DataLoader(
        train_set,
        sampler=EpochIndexSampler(base, batch_size=cfg.batch_size_per_gpu),
        batch_size=cfg.batch_size_per_gpu,
        num_workers=num_workers,
        collate_fn=multicrop_collate,
        drop_last=True,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=worker_init_fn if num_workers > 0 else None,
    )


# ------------------------------------------------------------------------------------ the model


def build_loss(cfg: Any) -> CMDLoss:
    """`CMDLoss.from_preset(cfg.loss, ...)` with the config's temperatures, centering and term weights.

    Reads ``loss``, ``out_dim``, ``local_crops_number``, ``warmup_teacher_temp``, ``teacher_temp``,
    ``warmup_teacher_temp_epochs``, ``student_temp``, ``center_momentum``, ``centering``,
    ``koleo_weight``, ``fused_region_chunk`` (0: off) and the weights ``image_weight``,
    ``region_weight``, ``inter_weight``, ``swapped_weight`` (None keeps the preset's).
    Build it first: its ``student_outputs`` tell `build_network` which head parts to build.
    """
    weights = {name: getattr(cfg, name, None) for name in ("image_weight", "region_weight", "inter_weight",
                                                            "swapped_weight")}
    return CMDLoss.from_preset(
        cfg.loss,
        out_dim=cfg.out_dim,
        n_global_crops=N_GLOBAL_CROPS,
        n_local_crops=cfg.local_crops_number,
        warmup_teacher_temp=cfg.warmup_teacher_temp,
        teacher_temp=cfg.teacher_temp,
        warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
        student_temp=cfg.student_temp,
        center_momentum=cfg.center_momentum,
        centering=cfg.centering,
        koleo_weight=cfg.koleo_weight,
        fused_chunk_size=getattr(cfg, "fused_region_chunk", 0) or None,
        **{k: v for k, v in weights.items() if v is not None},
    )


def build_network(cfg: Any, *, outputs: frozenset[str] | None = None) -> CMDNetwork:
    """The student: ``create_backbone(cfg.arch, **cfg.backbone_kwargs)`` and a `CrossLevelHead`.

    Call ``torch.manual_seed(cfg.seed)`` first for the program's initial weights. With ``cfg.init``
    the backbone starts from that checkpoint (``init_key``; ``init_partial`` loads what fits);
    ``network.backbone.load_report`` then says what loaded.

    Reads ``arch``, ``backbone_kwargs``, ``drop_path`` (timm's ``drop_path_rate``; 0 or absent: none), ``init``, ``init_key``, ``init_partial``, ``out_dim``,
    ``head_hidden_dim``, ``head_bottleneck_dim``, ``mil_pooling``, ``image_input``,
    ``norm_last_layer``, ``share_prototypes``, ``head_bn``, ``loss``, ``fused_region_chunk``.

    Args:
        cfg: the config.
        outputs: the loss's ``student_outputs``; only the head parts it consumes are built, so that
            every parameter gets a gradient (DDP without ``find_unused_parameters``). None builds all.

    Raises:
        ValueError: the checkpoint does not fit (with ``init_partial``: nothing of it loads).
    """
    init = getattr(cfg, "init", None)
    image_input = getattr(cfg, "image_input", "pooled")
    mil = outputs is None or "mil_weights" in outputs or image_input == "mil"
    regions = outputs is None or bool({"region", "region_embedding"} & outputs)
    load = ({"checkpoint": init, "checkpoint_key": getattr(cfg, "init_key", "teacher"),
             "strict": not getattr(cfg, "init_partial", False)} if init else {})
    timm_kwargs = dict(cfg.backbone_kwargs or {})
    if getattr(cfg, "drop_path", 0):  # the student's stochastic depth (the teacher's is 0: build_teacher)
        timm_kwargs["drop_path_rate"] = cfg.drop_path
    backbone = create_backbone(cfg.arch, pretrained=False, **load, **timm_kwargs)
    report = backbone.load_report
    if report is not None and report.loaded == 0:
        raise ValueError(f"nothing loads into {cfg.arch}: {report.summary()}")
    head = CrossLevelHead(
        backbone.embed_dim,
        out_dim=cfg.out_dim,
        hidden_dim=cfg.head_hidden_dim,
        bottleneck_dim=cfg.head_bottleneck_dim,
        pooling=cfg.mil_pooling if mil else None,
        image_input=image_input,
        norm_last_layer=cfg.norm_last_layer,
        share_prototypes=getattr(cfg, "share_prototypes", False),
        use_bn=cfg.head_bn,
        region_head=cfg.loss != "dino" and regions,
        region_output="embedding" if getattr(cfg, "fused_region_chunk", 0) else "logits",
    )
    return CMDNetwork(backbone, head)


def build_teacher(cfg: Any, student: nn.Module, total_steps: int, *, check_finite: bool = True) -> EMATeacher:
    """The EMA teacher of ``student``: momentum ``cfg.momentum_teacher`` -> 1 over ``total_steps`` (cosine).

    The teacher is a copy of the student without stochastic depth (see `cmd.EMATeacher`).
    ``check_finite=False`` when the loop skips non-finite steps itself (as the program does).
    """
    return EMATeacher(student, momentum=cfg.momentum_teacher, final_momentum=1.0, total_steps=total_steps,
                      check_finite=check_finite)


# ---------------------------------------------------------------------------- the optimisation


def build_optimizer(cfg: Any, student: nn.Module) -> torch.optim.AdamW:
    """AdamW over `cmd.param_groups` (no weight decay on biases and norms), fused where torch has it.

    The fused kernel (CUDA; the CPU since torch 2.4) is several times faster than the per-tensor
    loop; the plain AdamW is the fallback. Reads ``weight_decay``. Learning rate and weight decay
    are set every step from `build_schedules` (`cmd.set_schedules`).
    """
    groups = param_groups(student, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(param_groups(student, weight_decay=cfg.weight_decay))


class Schedules(NamedTuple):
    """Per-step values ``[epochs * iters_per_epoch]`` (float64 numpy arrays)."""

    lr: np.ndarray
    weight_decay: np.ndarray


def build_schedules(cfg: Any, iters_per_epoch: int, world_size: int = 1) -> Schedules:
    """The program's per-step learning rate and weight decay.

    - lr: ``cfg.lr`` scaled linearly by the total batch (``batch_size_per_gpu * world_size / 256``),
      a linear warm-up over ``min(warmup_epochs, epochs)`` epochs, then a half cosine to ``min_lr``;
    - weight decay: a half cosine from ``weight_decay`` to ``weight_decay_end``.

    Reads ``lr``, ``min_lr``, ``batch_size_per_gpu``, ``epochs``, ``warmup_epochs``,
    ``weight_decay``, ``weight_decay_end``.

    Example:
        >>> from types import SimpleNamespace
        >>> cfg = SimpleNamespace(lr=5e-4, min_lr=1e-6, batch_size_per_gpu=64, epochs=2, warmup_epochs=1,
        ...                       weight_decay=0.04, weight_decay_end=0.4)
        >>> s = build_schedules(cfg, iters_per_epoch=10, world_size=4)
        >>> len(s.lr), float(s.lr.max()), round(float(s.weight_decay[0]), 6)
        (20, 0.0005, 0.04)
    """
    lr = cosine_schedule(scale_lr(cfg.lr, cfg.batch_size_per_gpu * world_size), cfg.min_lr, cfg.epochs,
                         iters_per_epoch, warmup_epochs=min(cfg.warmup_epochs, cfg.epochs))
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, iters_per_epoch)
    return Schedules(lr, wd)
