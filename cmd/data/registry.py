"""`build_dataset`: one entry point for the fine-grained datasets of the protocols."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .cub import CUB200
from .digits import Digits
from .image_list import ImageListDataset
from .synthetic import SyntheticFineGrained

__all__ = ["build_dataset", "DATASETS"]

_ALIASES = {
    "synthetic": "synthetic",
    "synthetic_fine_grained": "synthetic",
    "cub": "cub200",
    "cub200": "cub200",
    "cub_200": "cub200",
    "cub_200_2011": "cub200",
    "cars": "stanford_cars",
    "stanford_cars": "stanford_cars",
    "stanfordcars": "stanford_cars",
    "aircraft": "fgvc_aircraft",
    "fgvc_aircraft": "fgvc_aircraft",
    "fgvcaircraft": "fgvc_aircraft",
    "imagefolder": "imagefolder",
    "image_folder": "imagefolder",
    "digits": "digits",
    "sklearn_digits": "digits",
}

#: canonical dataset names accepted by `build_dataset` (aliases such as "cub" or "cars" too)
DATASETS = ("synthetic", "digits", "cub200", "stanford_cars", "fgvc_aircraft", "imagefolder")


def _stanford_cars(root: Path, split: str, transform, target_transform) -> ImageListDataset:
    from torchvision.datasets import StanfordCars

    if split not in ("train", "test"):
        raise ValueError(f"Stanford Cars split must be 'train' or 'test', got {split!r}")
    base = root / "stanford_cars"
    needed = (
        [base / "devkit" / "cars_train_annos.mat", base / "cars_train"]
        if split == "train"
        else [base / "cars_test_annos_withlabels.mat", base / "cars_test"]
    )
    needed.append(base / "devkit" / "cars_meta.mat")
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"Stanford Cars ({split}) not found: missing {missing}. torchvision cannot download it; place "
            f"devkit/ (cars_meta.mat, cars_train_annos.mat), cars_train/, cars_test/ and "
            f"cars_test_annos_withlabels.mat under {base}"
        )
    data = StanfordCars(str(root), split=split, download=False)
    return ImageListDataset(
        data._samples, data.classes, transform, target_transform, source=str(base / f"cars_{split}")
    )


def _fgvc_aircraft(root: Path, split: str, transform, target_transform) -> ImageListDataset:
    from torchvision.datasets import FGVCAircraft

    split = {"train": "trainval"}.get(split, split)  # the protocol trains on trainval (6,667 images)
    if split not in ("trainval", "val", "test", "train_only"):
        raise ValueError(f"FGVC-Aircraft split must be 'train' (= trainval), 'trainval', 'val' or 'test', got {split!r}")
    tv_split = "train" if split == "train_only" else split
    base = root / "fgvc-aircraft-2013b"
    labels_file = base / "data" / f"images_variant_{tv_split}.txt"
    needed = (labels_file, base / "data" / "variants.txt", base / "data" / "images")
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"FGVC-Aircraft ({split}) not found: missing {missing}. Download fgvc-aircraft-2013b.tar.gz from "
            f"https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it in {root} (so that {base} exists)"
        )
    data = FGVCAircraft(str(root), split=tv_split, annotation_level="variant", download=False)
    return ImageListDataset(
        list(zip(data._image_files, data._labels)), data.classes, transform, target_transform, source=str(labels_file)
    )


def _class_folders(folder: Path) -> list[str]:
    """The class names of an image folder: its sub-folders (symlinks to folders included), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _image_files(class_dir: Path) -> list[str]:
    """Image files under ``class_dir`` (recursively, torchvision's extensions and order).

    Directory symlinks are followed, except one that leads back to a folder it sits in (a loop,
    which ``os.walk(followlinks=True)`` would list again and again): that raises a ValueError
    naming the link.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    per_folder: list[tuple[str, list[str]]] = []

    def visit(directory: str, ancestors: frozenset[str]) -> None:
        ancestors = ancestors | {os.path.realpath(directory)}
        files = []
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_dir():
                    target = os.path.realpath(entry.path)
                    if target in ancestors:
                        raise ValueError(
                            f"directory symlink loop in an image folder: {entry.path} -> {target}, a folder that "
                            "contains the link; remove the link"
                        )
                    visit(entry.path, ancestors)
                elif entry.is_file() and has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    files.append(entry.path)
        per_folder.append((directory, files))

    visit(str(class_dir), frozenset())
    return [path for _, files in sorted(per_folder) for path in files]


def _image_folder(
    root: Path, split: str, transform, target_transform, classes: list[str] | None = None
) -> ImageListDataset:
    """``root/split/<class>/<image>``; the messages name the folder at fault and say what is wrong with it.

    The split's own class folders define its classes when no other list applies: then each must
    hold an image (an empty one raises a ValueError naming it). A split labelled by another list
    (``classes=``, or ``root/train`` for a test split) may lack some of its classes: a class whose
    folder is missing and one whose folder is empty are the same case (the class has no image in
    this split) and get one warning naming both kinds.
    """
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {folder} (expected {folder}/<class>/<image>; "
            "pass split='' to read root/<class>/<image>)"
        )
    present = _class_folders(folder)
    reference = "the classes= list"
    if classes is None and split not in ("", "train") and (root / "train").is_dir():
        classes, reference = _class_folders(root / "train"), str(root / "train")
    own_classes = classes is None
    if own_classes:
        if not present:
            loose = sum(1 for entry in folder.iterdir() if entry.is_file())
            raise ValueError(
                f"{folder} has no class folders (expected {folder}/<class>/<image>"
                + (f"; it holds {loose} files directly" if loose else "")
                + ")"
            )
        classes = present
    else:
        classes = list(classes)
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise ValueError(
                f"{folder} has {len(unknown)} classes that {reference} lacks: {unknown[:10]}; the labels come "
                f"from {reference}'s class list, so these images could not be labelled consistently"
            )
    samples, absent, empty = [], [], []
    for index, name in enumerate(classes):
        if name not in present:
            absent.append(name)
            continue
        files = _image_files(folder / name)
        if not files:
            empty.append(name)
        samples += [(path, index) for path in files]
    if own_classes and empty:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        shown = ", ".join(str(folder / name) for name in empty[:10])
        raise ValueError(
            f"{len(empty)} class folder{'s' if len(empty) > 1 else ''} of {folder} hold{'' if len(empty) > 1 else 's'} "
            f"no image file: {shown}{', ...' if len(empty) > 10 else ''}; every class needs at least one image "
            f"({' '.join(IMG_EXTENSIONS)}): add images or remove the folder"
        )
    if not samples:
        raise ValueError(
            f"{folder} holds no image of the {len(classes)} classes of {reference}: "
            + (f"its class folders {sorted(set(present) & set(classes))[:10]} are empty" if present
               else f"it has no class folders (expected {folder}/<class>/<image>)")
        )
    if absent or empty:
        kinds = ([f"no folder for {absent[:10]}"] if absent else []) + (
            [f"empty folders {[str(folder / name) for name in empty[:10]]}"] if empty else [])
        warnings.warn(
            f"{folder} has no image for {len(absent) + len(empty)} of the {len(classes)} classes of {reference} "
            f"({'; '.join(kinds)}); labels follow {reference}'s class list, and results on this split cover "
            "only the classes it has",
            stacklevel=3,
        )
    return ImageListDataset(
        samples, classes, transform, target_transform, source=str(folder), allow_empty_classes=True
    )


def build_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable[[Any], Any] | None = None,
    *,
    target_transform: Callable[[int], Any] | None = None,
    **kwargs: Any,
) -> Dataset:
    """Build a dataset by name; samples are ``(image, label)`` with a PIL image or ``transform(image)``.

    Names (case-insensitive, ``-`` or ``_``):

    - ``"synthetic"``: [`SyntheticFineGrained`][cmd.data.SyntheticFineGrained] (``root`` unused; ``kwargs`` go to it, e.g.
      ``n_classes``, ``image_size``, ``return_part_mask``).
    - ``"digits"``: [`Digits`][cmd.data.Digits], scikit-learn's bundled 8 x 8 handwritten digits
      upsampled to 32 px (``root`` unused; no download; needs scikit-learn: ``pip install
      cmd-fgvc[viz]``); splits ``train`` / ``test``, stratified and drawn by ``seed`` (a kwarg, with
      ``test_fraction`` and ``image_size``).
    - ``"cub200"`` / ``"cub"``: [`CUB200`][cmd.data.CUB200] from ``root`` (the ``CUB_200_2011`` folder or its
      parent); splits ``train`` / ``test``.
    - ``"stanford_cars"`` / ``"cars"``: torchvision's ``StanfordCars`` layout under
      ``root/stanford_cars`` (``download=False``: torchvision cannot download it any more);
      splits ``train`` / ``test``.
    - ``"fgvc_aircraft"`` / ``"aircraft"``: torchvision's ``FGVCAircraft`` layout under
      ``root/fgvc-aircraft-2013b``, variant level (100 classes); ``train`` means ``trainval``
      (6,667 images, the protocol), also ``val``, ``test`` and ``train_only`` (torchvision's "train").
    - ``"imagefolder"``: ``root/split/<class>/<image>`` (``split=""`` reads ``root/<class>/<image>``),
      with torchvision's ``ImageFolder`` file rules. Labels come from **one** class list, so that
      splits agree: ``classes=[...]`` when given, else for a split other than ``train`` the class
      folders of ``root/train`` when it exists, else the split's own folders (sorted). A class of the
      split missing from that list raises a ValueError naming it; a listed class without images in
      the split (no folder, or an empty one: the same case) is allowed, with one warning naming them.
      When the split's own folders are the class list, each must hold an image: an empty class
      folder raises a ValueError naming it. Directory symlink loops raise a ValueError naming the link.

    The file-based datasets are `ImageListDataset` objects: they expose ``samples``,
    ``targets``, ``classes`` and ``num_classes``, and name the file in every error (a missing
    dataset says where to put the files).

    Example:
        >>> data = build_dataset("synthetic", split="test", n_classes=5, n_per_class=4)
        >>> len(data), data.num_classes
        (20, 5)
    """
    key = _ALIASES.get(name.lower().replace("-", "_"))
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; expected one of {list(DATASETS)} (or an alias: {sorted(_ALIASES)})")
    if key == "synthetic":
        return SyntheticFineGrained(split=split, transform=transform, target_transform=target_transform, **kwargs)
    if key == "digits":
        return Digits(split=split, transform=transform, target_transform=target_transform, **kwargs)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory")
    if key == "cub200":
        return CUB200(root, split, transform, target_transform, **kwargs)
    if key == "imagefolder":
        classes = kwargs.pop("classes", None)
        if kwargs:
            raise TypeError(f"unexpected arguments for dataset {name!r}: {sorted(kwargs)}")
        return _image_folder(Path(root), split, transform, target_transform, classes)
    if kwargs:
        raise TypeError(f"unexpected arguments for dataset {name!r}: {sorted(kwargs)}")
    builder = {"stanford_cars": _stanford_cars, "fgvc_aircraft": _fgvc_aircraft}[key]
    return builder(Path(root), split, transform, target_transform)
