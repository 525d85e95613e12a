"""`ImageListDataset`: labelled image files on disk, with errors that name the file at fault."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
from torch.utils.data import Dataset

__all__ = ["ImageListDataset", "load_rgb"]


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _sixteen_bit_to_l(image: PIL.Image.Image, path: str | os.PathLike) -> PIL.Image.Image:
    """A 16-bit grayscale image (PIL mode ``I;16*`` or ``I``) scaled to 8 bits: ``round(v * 255 / 65535)``.

    PIL's own ``convert("RGB")`` clips these values at 255 (a 16-bit image comes out almost white).
    Mode ``I`` (32-bit integers, how some 16-bit files open) must hold values in [0, 65535].
    """
    values = np.asarray(image, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"image {os.fspath(path)} (PIL mode {image.mode!r}) has values in [{values.min()}, {values.max()}], "
            "outside the 16-bit range [0, 65535]; convert it to an 8-bit image first"
        )
    return PIL.Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def _float_to_l(image: PIL.Image.Image, path: str | os.PathLike) -> PIL.Image.Image:
    """A 32-bit float grayscale image (PIL mode ``F``, e.g. a float TIFF) with values in [0, 1] scaled to
    8 bits: ``round(v * 255)``.

    PIL's own ``convert("RGB")`` truncates these values to the integers 0 and 1 (the image comes out
    black). Values outside [0, 1] (or NaN / inf) are ambiguous (a [0, 255] or [0, 65535] range, HDR
    data) and refused, naming the file and the range found.
    """
    values = np.asarray(image, dtype=np.float64)
    if values.size and not np.isfinite(values).all():
        raise ValueError(
            f"image {os.fspath(path)} (PIL mode 'F', 32-bit float) holds NaN or infinite values; "
            "convert it to an 8-bit image first"
        )
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(
            f"image {os.fspath(path)} (PIL mode 'F', 32-bit float) has values in [{values.min():.6g}, "
            f"{values.max():.6g}]; float images are read as intensities in [0, 1] (scaled by 255), other "
            "ranges are ambiguous: convert it to an 8-bit image first"
        )
    return PIL.Image.fromarray(np.round(values * 255).astype(np.uint8), mode="L")


def load_rgb(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file fully as an RGB PIL image.

    16-bit grayscale images (PNG ``I;16`` / ``I``) are scaled to 8 bits (``v * 255 / 65535``, rounded)
    rather than clipped at 255 as ``PIL.Image.convert`` does. 32-bit float images (mode ``F``, e.g.
    float TIFFs) must hold values in [0, 1] and are scaled to 8 bits (``v * 255``, rounded) rather
    than truncated to 0 / 1 (black) as ``convert`` does; other float ranges are refused.

    Raises:
        FileNotFoundError: when the file does not exist.
        OSError: when the file is unreadable (a corrupt or truncated JPEG), naming the file.
        PIL.Image.DecompressionBombError: an image above ``PIL.Image.MAX_IMAGE_PIXELS``, naming the file.
        ValueError: a 32-bit integer image with values outside [0, 65535], or a float image with
            values outside [0, 1] (or NaN / inf), naming the file.
    """
    try:
        with PIL.Image.open(path) as image:
            if image.mode in _SIXTEEN_BIT_MODES:
                image.load()
                return _sixteen_bit_to_l(image, path).convert("RGB")
            if image.mode == "F":
                image.load()
                return _float_to_l(image, path).convert("RGB")
            return image.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}") from err
    except PIL.Image.DecompressionBombError as err:
        raise PIL.Image.DecompressionBombError(
            f"image {os.fspath(path)} is too large to open safely ({err}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "(or set it to None) if you trust the file"
        ) from err
    except (OSError, SyntaxError) as err:  # PIL raises these for corrupt files
        raise OSError(f"cannot read image {os.fspath(path)}: {err}") from err
    except ValueError as err:
        if os.fspath(path) in str(err):
            raise
        raise OSError(f"cannot read image {os.fspath(path)}: {err}") from err


class ImageListDataset(Dataset):
    """A dataset of ``(path, label)`` image files; samples are ``(image, label)``.

    ``image`` is an RGB PIL image (or ``transform(image)``), the label an int in
    ``[0, len(classes))``, as in torchvision's datasets. Every class must have at least one sample.

    Args:
        samples: (path, label) pairs.
        classes: class names, index = label.
        transform: applied to the PIL image.
        target_transform: applied to the label.
        source: what the sample list was read from, for error messages.
        check_files: check at construction that every file exists.
        allow_empty_classes: accept classes without a sample (an evaluation split that uses the
            training split's class list but lacks some of its classes); by default every class needs one.

    Attributes:
        samples, targets, classes, num_classes.

    Example:
        >>> data = ImageListDataset([("a.jpg", 0), ("b.jpg", 1)], ["cat", "dog"], check_files=False)
        >>> data.targets, data.num_classes
        ([0, 1], 2)
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        classes: Sequence[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        *,
        source: str = "the sample list",
        check_files: bool = True,
        allow_empty_classes: bool = False,
    ) -> None:
        self.samples = [(os.fspath(path), int(label)) for path, label in samples]
        self.classes = list(classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.target_transform = target_transform
        self.source = source
        if not self.samples:
            raise ValueError(f"no images listed in {source}")
        bad = [label for label in self.targets if not 0 <= label < len(self.classes)]
        if bad:
            raise ValueError(f"{source}: label {bad[0]} outside [0, {len(self.classes)})")
        counts = [0] * len(self.classes)
        for label in self.targets:
            counts[label] += 1
        empty = [self.classes[c] for c, n in enumerate(counts) if n == 0]
        if empty and not allow_empty_classes:
            raise ValueError(f"{source}: {len(empty)} classes have no image, e.g. {empty[:5]}")
        if check_files:
            missing = [path for path, _ in self.samples if not os.path.isfile(path)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image files listed in {source} are missing, e.g. {missing[:3]}"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, label = self.samples[index]
        image: Any = load_rgb(path)
        if self.transform is not None:
            image = self.transform(image)
        target: Any = label if self.target_transform is None else self.target_transform(label)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes, from {self.source})"
