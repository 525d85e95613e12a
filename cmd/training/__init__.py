"""What a training loop needs to train exactly as ``cmd-fgvc pretrain`` does, built from a config.

- `cmd.training.data`: `SeededMultiCrop` (augmentations seeded per (seed, epoch, image)),
  `EpochIndexSampler` (a resumable per-epoch order, several epochs per loader pass) and
  `epoch_batches` (split that pass by epoch);
- `cmd.training.build`: ``build_*`` helpers that read a config (a recipe of `cmd.recipes`, or any
  object with the option names of ``cmd-fgvc pretrain``) and return the dataset, loader, network,
  loss, EMA teacher, optimiser and per-step schedules.

Example:
    >>> import cmd
    >>> from cmd.training import build_loss, build_network
    >>> cfg = cmd.recipes.get("demo")  # doctest: +SKIP
    >>> student = build_network(cfg, outputs=build_loss(cfg).student_outputs)  # doctest: +SKIP
"""

from cmd.training.build import (
    Schedules,
    build_data,
    build_loss,
    build_multicrop,
    build_network,
    build_optimizer,
    build_schedules,
    build_teacher,
    build_train_loader,
)
from cmd.training.data import EpochIndexSampler, SeededMultiCrop, epoch_batches

__all__ = [
    "EpochIndexSampler",
    "Schedules",
    "SeededMultiCrop",
    "build_data",
    "build_loss",
    "build_multicrop",
    "build_network",
    "build_optimizer",
    "build_schedules",
    "build_teacher",
    "build_train_loader",
    "epoch_batches",
]
