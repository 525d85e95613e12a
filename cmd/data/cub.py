"""CUB-200-2011 read from its official directory layout."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .image_list import ImageListDataset

__all__ = ["CUB200", "find_cub_root"]

_SPLIT_FLAG = {"train": 1, "test": 0}
_REQUIRED = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def find_cub_root(root: str | os.PathLike) -> Path:
    """The ``CUB_200_2011`` directory: ``root`` itself or ``root/CUB_200_2011``.

    Raises:
        FileNotFoundError: naming the first required file that is missing.
    """
    root = Path(root)
    for candidate in (root, root / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            base = candidate
            break
    else:
        raise FileNotFoundError(
            f"CUB-200-2011 not found: expected {root / 'CUB_200_2011' / 'images.txt'} (or {root / 'images.txt'}); "
            "extract CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/) into the root"
        )
    for name in (*_REQUIRED, "images"):
        if not (base / name).exists():
            raise FileNotFoundError(f"CUB-200-2011 file missing: {base / name}")
    return base


def _read_pairs(path: Path) -> dict[int, str]:
    """``<id> <value>`` lines -> {id: value}, with errors naming the file and line."""
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}, line {line_no}: expected '<id> <value>', got {line.rstrip()!r}")
            key = int(parts[0])
            if key in table:
                raise ValueError(f"{path}, line {line_no}: id {key} appears twice")
            table[key] = parts[1].strip()
    if not table:
        raise ValueError(f"{path} is empty")
    return table


def _read_ints(path: Path) -> dict[int, int]:
    table = _read_pairs(path)
    out = {}
    for key, value in table.items():
        if not value.lstrip("-").isdigit():
            raise ValueError(f"{path}: id {key} has a non-integer value {value!r}")
        out[key] = int(value)
    return out


class CUB200(ImageListDataset):
    """CUB-200-2011 (Wah et al., 2011): 200 bird species, 5,994 train / 5,794 test images.

    Reads the official layout::

        root/CUB_200_2011/            (or root itself)
            images.txt                <image id> <relative path under images/>
            image_class_labels.txt    <image id> <class id, 1-based>
            train_test_split.txt      <image id> <1 = train, 0 = test>
            classes.txt               <class id> <name>   (optional)
            images/<class folder>/<file>.jpg

    Samples are ``(image, label)`` with an RGB PIL image (or ``transform(image)``) and
    ``label = class id - 1`` in [0, 200). Missing files, malformed lines, images absent from a
    table, classes without an image in the split and unreadable images raise errors naming the
    file at fault.

    Args:
        root: the ``CUB_200_2011`` directory or its parent.
        split: ``"train"`` or ``"test"``.
        transform: applied to the PIL image.
        target_transform: applied to the label.
        check_files: check at construction that every image file of the split exists.

    Example:
        >>> train = CUB200("/data/cub", split="train")  # doctest: +SKIP
        >>> len(train), train.num_classes  # doctest: +SKIP
        (5994, 200)
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        *,
        check_files: bool = True,
    ) -> None:
        if split not in _SPLIT_FLAG:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        base = find_cub_root(root)
        self.root = base
        self.split = split
        images = _read_pairs(base / "images.txt")
        labels = _read_ints(base / "image_class_labels.txt")
        is_train = _read_ints(base / "train_test_split.txt")
        for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
            missing = sorted(set(images) - set(table))
            if missing:
                raise ValueError(f"{base / name}: no entry for image ids {missing[:5]} listed in images.txt")
        bad_flags = sorted({v for v in is_train.values()} - {0, 1})
        if bad_flags:
            raise ValueError(f"{base / 'train_test_split.txt'}: flags must be 0 or 1, got {bad_flags}")

        if (base / "classes.txt").is_file():
            class_table = _read_pairs(base / "classes.txt")
            classes = [class_table[k] for k in sorted(class_table)]
            if sorted(class_table) != list(range(1, len(classes) + 1)):
                raise ValueError(f"{base / 'classes.txt'}: class ids must be 1..{len(classes)}")
        else:
            n_classes = max(labels.values())
            folder_of = {labels[i]: images[i].split("/")[0] for i in sorted(images)}
            classes = [folder_of.get(c, f"class_{c:03d}") for c in range(1, n_classes + 1)]
        bad = sorted({c for c in labels.values() if not 1 <= c <= len(classes)})
        if bad:
            raise ValueError(f"{base / 'image_class_labels.txt'}: class ids {bad[:5]} outside 1..{len(classes)}")

        flag = _SPLIT_FLAG[split]
        samples = [
            (str(base / "images" / images[i]), labels[i] - 1) for i in sorted(images) if is_train[i] == flag
        ]
        super().__init__(
            samples,
            classes,
            transform,
            target_transform,
            source=f"{base} (split {split!r} of train_test_split.txt)",
            check_files=check_files,
        )
