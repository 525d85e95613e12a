"""Datasets: CUB-200-2011, Stanford Cars, FGVC-Aircraft, image folders, a synthetic fine-grained set, digits.

Every dataset yields ``(image, label)`` with an RGB PIL image (or ``transform(image)``), like
torchvision's datasets, and exposes ``classes``, ``targets`` and ``num_classes``.
[`SyntheticFineGrained`][cmd.data.SyntheticFineGrained] needs no files and is the default data of the examples and tests;
[`SyntheticBroad`][cmd.data.SyntheticBroad] is its broad counterpart for a two-stage protocol's generic stage;
[`Digits`][cmd.data.Digits] (scikit-learn's bundled handwritten digits) is a small real-image set that needs no download.

Example:
    >>> from cmd.data import SyntheticFineGrained, build_dataset
    >>> train = SyntheticFineGrained(n_classes=5, n_per_class=4, image_size=32)
    >>> len(train), train.num_classes
    (20, 5)
    >>> cub = build_dataset("cub200", "/data/cub", split="test")  # doctest: +SKIP
"""

from __future__ import annotations

from .cub import CUB200
from .digits import Digits
from .image_list import ImageListDataset, load_rgb
from .registry import DATASETS, build_dataset
from .synthetic import SyntheticFineGrained, SyntheticSample
from .synthetic_broad import SyntheticBroad

__all__ = [
    "CUB200",
    "Digits",
    "ImageListDataset",
    "load_rgb",
    "DATASETS",
    "build_dataset",
    "SyntheticFineGrained",
    "SyntheticSample",
    "SyntheticBroad",
]
