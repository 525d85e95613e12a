"""Real images without a download: scikit-learn's bundled handwritten digits, upsampled, with a seeded split.

`Digits` wraps ``sklearn.datasets.load_digits``: 1,797 scans of handwritten digits (UCI "Optical
Recognition of Handwritten Digits", 43 writers), 8 x 8 pixels with 17 grey levels, 10 classes of
174-183 images. The data ships inside the scikit-learn wheel, so it works offline and in CI. It is
a small *real-image* benchmark for the methods at CPU scale: classes told apart by local strokes
(a 3 against an 8, a 1 against a 7) under writer variation. It is **not** fine-grained in the
birds-and-cars sense: no background clutter, no pose, a centred object.

Each image is rendered as an RGB PIL image of ``image_size`` pixels (bilinear upsampling of the 8 x 8
scan, grey in all three channels, ink light on dark as in the source), so the multi-crop and
evaluation transforms work on it as on any image dataset. The train / test split is stratified
(the same share of every class in the test split) and a pure function of ``seed``.

scikit-learn is an optional dependency (``pip install cmd-fgvc[viz]``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
from torch.utils.data import Dataset

__all__ = ["Digits", "load_digits_arrays"]

_SPLITS = ("train", "test")
_SPLIT_STREAM = 0xD161  # separates the split's generator from any other use of the seed


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (images float64 [1797, 8, 8] in 0..16, labels int64 [1797]).

    Raises:
        ImportError: scikit-learn is missing (naming the extra that installs it).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the digits dataset is scikit-learn's (sklearn.datasets.load_digits, bundled, no download): "
            "pip install 'cmd-fgvc[viz]' (or pip install scikit-learn)"
        ) from err
    data = load_digits()
    return np.asarray(data.images, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of the train and test splits: per class, ``round(test_fraction * n_c)`` images drawn for test.

    Both index arrays are sorted; the draw depends only on ``seed`` (and the labels).
    """
    rng = np.random.default_rng([_SPLIT_STREAM, seed])
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.choice(members, size=n_test, replace=False))
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return {"train": train_idx, "test": test_idx}


class Digits(Dataset):
    """scikit-learn's handwritten digits as RGB images of ``image_size`` px, with a seeded stratified split.

    A sample is ``(image, label)``: a PIL RGB image (or ``transform(image)``) and an int in 0..9.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: draws the split (the same seed, the same split).
        test_fraction: share of every class in the test split, in (0, 1).
        image_size: side in pixels (>= 8; 32 is the CPU demo's size).
        transform: applied to the PIL image.
        target_transform: applied to the label.

    Attributes:
        classes: ``["0", ..., "9"]``; num_classes: 10; targets: the label of every index;
        indices: the positions of this split's images in ``load_digits()``.

    Raises:
        ImportError: scikit-learn is missing. ValueError: a bad argument (named).

    Example:
        >>> train = Digits("train", seed=0)  # doctest: +SKIP
        >>> len(train), train.num_classes, train[0][0].size  # doctest: +SKIP
        (898, 10, (32, 32))
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        test_fraction: float = 0.5,
        image_size: int = 32,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        images, labels = load_digits_arrays()
        self.split, self.seed, self.test_fraction, self.image_size = split, seed, test_fraction, image_size
        self.transform, self.target_transform = transform, target_transform
        self.indices = stratified_split(labels, test_fraction, seed)[split]
        self._images = images[self.indices]
        self.targets = [int(y) for y in labels[self.indices]]
        self.classes = [str(c) for c in range(10)]

    @property
    def num_classes(self) -> int:
        """Number of classes (10)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={self.split!r}, seed={self.seed}, test_fraction={self.test_fraction}, "
                f"image_size={self.image_size}, n={len(self)})")

    def image(self, index: int) -> PIL.Image.Image:
        """Image ``index`` as an RGB PIL image of ``image_size`` px (bilinear upsampling of the 8 x 8 scan)."""
        grey = PIL.Image.fromarray(np.round(self._images[index] * (255.0 / 16.0)).astype(np.uint8))
        if self.image_size != 8:
            grey = grey.resize((self.image_size, self.image_size), PIL.Image.BILINEAR)
        return grey.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        image: Any = self.image(index)
        if self.transform is not None:
            image = self.transform(image)
        label: Any = self.targets[index]
        return image, label if self.target_transform is None else self.target_transform(label)
