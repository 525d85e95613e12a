"""A broad synthetic set for generic (stage-1) self-supervised pretraining, apart from any fine-grained task.

The paper does not train from scratch: it continues from a checkpoint pretrained on a broad data set
(EsViT on ImageNet) and then trains on the fine-grained one. `SyntheticBroad` plays ImageNet's part
for `SyntheticFineGrained`: four kinds of scene (the ``demo``, ``easy``, ``medium`` and ``hard``
difficulties: parts of 0.4 to 0.2 of the side, calm to cluttered backgrounds), each with its own
classes, so the network meets many objects and many part patterns. Its class patterns are
4 x 4 cells (C(16, 8) = 12870 of them) drawn from seeds no fine-grained set of this library uses
(``seed + SEED_OFFSET + kind``), so they are not the 3 x 3 patterns of the ``demo`` / ``easy`` /
``medium`` sets, and meet a ``hard`` set's 4 x 4 patterns only by chance. A fine-grained task is
never a subset of it, as CUB's 200 species are not ImageNet's classes.

Every image is a pure function of ``(seed, split, index)``; samples are sorted by scene kind, then
by class.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from .synthetic import SyntheticFineGrained

__all__ = ["SCENE_KINDS", "SEED_OFFSET", "SyntheticBroad"]

SCENE_KINDS = ("demo", "easy", "medium", "hard")  # difficulties of cmd.data.synthetic.DIFFICULTIES
SEED_OFFSET = 1_000_003  # the class patterns of kind k come from seed + SEED_OFFSET + k
CODE_SIDE = 4  # 4 x 4-cell patterns for every kind


class SyntheticBroad(Dataset):
    """Many classes over four kinds of synthetic scene: the broad data of a two-stage protocol.

    A sample is ``(image, label)`` (or ``(image, label, part_mask)`` with ``return_part_mask``), as
    `SyntheticFineGrained`'s; ``label`` runs over all ``n_classes`` classes, ``n_classes // 4`` per
    scene kind (`SCENE_KINDS`).

    Args:
        n_classes: total number of classes, a multiple of 4 (>= 4).
        n_per_class: images per class and split.
        image_size: side in pixels (>= 16).
        split: ``"train"``, ``"test"`` or ``"val"``.
        seed: the data's seed (the patterns of kind ``k`` come from ``seed + SEED_OFFSET + k``).
        return_part_mask, transform, target_transform, cache: as for `SyntheticFineGrained`.

    Attributes:
        classes: the class names, ``"KIND/class_NN"``.
        targets: the label of every index.
        num_classes: ``n_classes``.

    Example:
        >>> data = SyntheticBroad(n_classes=8, n_per_class=2, image_size=32)
        >>> len(data), data.num_classes, data.classes[2], data[5][1]
        (16, 8, 'easy/class_0', 2)
    """

    def __init__(
        self,
        n_classes: int = 64,
        n_per_class: int = 30,
        image_size: int = 32,
        split: str = "train",
        seed: int = 0,
        return_part_mask: bool = False,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        cache: bool = True,
    ) -> None:
        kinds = len(SCENE_KINDS)
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < kinds or n_classes % kinds:
            raise ValueError(f"n_classes must be a positive multiple of {kinds} (one share per scene kind "
                             f"{', '.join(SCENE_KINDS)}), got {n_classes!r}")
        per_kind = n_classes // kinds
        self.scenes = [
            SyntheticFineGrained(n_classes=per_kind, n_per_class=n_per_class, image_size=image_size, split=split,
                                 seed=seed + SEED_OFFSET + k, return_part_mask=return_part_mask, cache=cache,
                                 difficulty=kind, code_side=CODE_SIDE)
            for k, kind in enumerate(SCENE_KINDS)
        ]
        self.n_classes, self.n_per_class, self.image_size = n_classes, n_per_class, image_size
        self.split, self.seed, self.return_part_mask = split, seed, return_part_mask
        self.transform, self.target_transform = transform, target_transform
        self._per_scene = per_kind * n_per_class
        self.classes = [f"{kind}/{name}" for kind, scene in zip(SCENE_KINDS, self.scenes) for name in scene.classes]
        self.targets = [k * per_kind + t for k, scene in enumerate(self.scenes) for t in scene.targets]

    @property
    def num_classes(self) -> int:
        return self.n_classes

    def __len__(self) -> int:
        return len(self.scenes) * self._per_scene

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_classes={self.n_classes}, n_per_class={self.n_per_class}, "
                f"image_size={self.image_size}, split={self.split!r}, seed={self.seed}, kinds={SCENE_KINDS})")

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        if isinstance(index, bool):
            raise TypeError("index must be an int, got bool")
        index = operator.index(index)  # ints, numpy and 0-d integer tensors
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        kind, within = divmod(index, self._per_scene)
        image, _label, *mask = self.scenes[kind][within]
        label = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return (image, label, *mask)
