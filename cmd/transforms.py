"""DINO's multi-crop augmentation, the evaluation transform and a collate function (torchvision v2).

Seeding: every random choice (crop box, flip, jitter factors and order, grayscale, blur sigma,
solarisation) is drawn from torch's global RNG, so ``torch.manual_seed(s)`` before a call makes it
reproducible. In a ``DataLoader`` each worker's torch RNG is seeded with ``base_seed + worker_id``,
where ``base_seed`` is drawn from the main process's torch RNG (or from the loader's ``generator=``)
when the iterator is created: a seeded main process (or a seeded ``generator``) therefore gives the
same crops for any ``num_workers`` setting that stays fixed between runs.

Example:
    >>> import torch
    >>> aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=2)
    >>> crops = aug(torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8))
    >>> [tuple(c.shape) for c in crops]
    [(3, 32, 32), (3, 32, 32), (3, 16, 16), (3, 16, 16)]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ToRGBImage",
    "RandomGaussianBlur",
    "gaussian_blur",
    "MultiCropAugmentation",
    "DINO_COLOR_JITTER",
    "DINO_BLUR_SIGMA",
    "DINO_SOLARIZATION_PROB",
    "eval_transform",
    "multicrop_collate",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# DINO's photometric augmentation (official utils.py:47 and datasets/build.py:209-231): the Gaussian blur's
# sigma range (PIL radius 0.1 - 2.0 px), the colour jitter (brightness, contrast, saturation, hue) and the
# solarisation probability of the second global crop.
DINO_COLOR_JITTER: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
DINO_BLUR_SIGMA: tuple[float, float] = (0.1, 2.0)
DINO_SOLARIZATION_PROB = 0.2


class ToRGBImage:
    """Convert a PIL image or a uint8 tensor to a 3-channel uint8 image tensor [3, H, W].

    Grayscale (PIL "L", "1", "I", ...; tensors [H, W] or [1, H, W]) is replicated to three channels,
    an alpha channel (PIL "RGBA"/"LA"/"P" with transparency; tensors [4, H, W] or [2, H, W]) is dropped,
    as ``PIL.Image.convert("RGB")`` does. Anything else raises a TypeError/ValueError saying what was
    received.

    Example:
        >>> import torch
        >>> ToRGBImage()(torch.zeros(1, 5, 7, dtype=torch.uint8)).shape
        torch.Size([3, 5, 7])
    """

    def __call__(self, image: Any) -> torch.Tensor:
        if isinstance(image, PIL.Image.Image):
            if image.mode != "RGB":
                image = image.convert("RGB")
            return v2.functional.pil_to_tensor(image).as_subclass(torch.Tensor)
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8:
                raise TypeError(
                    f"image tensors must be uint8 [C, H, W] with values 0-255, got dtype {image.dtype}"
                )
            tensor = image.as_subclass(torch.Tensor)
            if tensor.ndim == 2:
                tensor = tensor.unsqueeze(0)
            if tensor.ndim != 3 or tensor.shape[0] not in (1, 2, 3, 4):
                raise ValueError(
                    f"image tensors must have shape [H, W] or [C, H, W] with C in 1-4, got {tuple(image.shape)}"
                )
            channels = tensor.shape[0]
            if channels in (1, 2):  # gray (+ alpha)
                return tensor[:1].expand(3, -1, -1).contiguous()
            return tensor[:3].contiguous()  # RGB (+ alpha)
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a uint8 or float image [C, H, W] with a Gaussian of std ``sigma`` pixels (separable, reflect pad).

    The kernel spans ``2 * ceil(3 * sigma) + 1`` taps (three sigmas each side, like PIL's radius-based
    filter, at most the image size); the result equals ``torchvision``'s ``gaussian_blur`` with that
    kernel size up to rounding, at about a sixth of the cost for the widest blur (two 1-D passes).
    """
    height, width = image.shape[-2:]
    radius = min(math.ceil(3.0 * sigma), height - 1, width - 1)
    if radius <= 0:
        return image
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[-3]
    out = image.as_subclass(torch.Tensor).to(torch.float32).unsqueeze(0)
    along_w = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    along_h = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), along_w, groups=channels)
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), along_h, groups=channels)
    out = out.squeeze(0)
    if image.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    else:
        out = out.to(image.dtype)
    return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.TVTensor) else out


class RandomGaussianBlur:
    """With probability ``p``, blur the image with a Gaussian of std drawn uniformly from ``sigma`` (DINO).

    Both draws use torch's global RNG. Works on uint8 or float image tensors [C, H, W].

    Example:
        >>> import torch
        >>> RandomGaussianBlur(p=1.0)(torch.zeros(3, 8, 8, dtype=torch.uint8)).shape
        torch.Size([3, 8, 8])
    """

    def __init__(self, p: float, sigma: tuple[float, float] = DINO_BLUR_SIGMA) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        if not 0.0 < sigma[0] <= sigma[1]:
            raise ValueError(f"sigma must be (low, high) with 0 < low <= high, got {sigma!r}")
        self.p = float(p)
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.p < 1.0 and not bool(torch.rand(()) < self.p):
            return image
        sigma = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return gaussian_blur(image, sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


def _check_size(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_scale(name: str, value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or not (0.0 < value[0] <= value[1] <= 1.0):
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {tuple(value)!r}")
    return (float(value[0]), float(value[1]))


def _check_color_jitter(value: Sequence[float]) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 4 or any(not math.isfinite(v) or v < 0 for v in values) or values[3] > 0.5:
        raise ValueError("color_jitter must be (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5, "
                         f"got {tuple(value)!r}")
    return values  # type: ignore[return-value]


def _check_blur_sigma(value: Sequence[float]) -> tuple[float, float]:
    if len(value) != 2 or not (0.0 < float(value[0]) <= float(value[1]) < math.inf):
        raise ValueError(f"blur_sigma must be (low, high) pixels with 0 < low <= high, got {tuple(value)!r}")
    return (float(value[0]), float(value[1]))


def _to_float_normalised(mean: Sequence[float], std: Sequence[float]) -> list:
    return [
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(mean), std=list(std)),
        v2.ToPureTensor(),
    ]


class MultiCropAugmentation:
    """DINO's multi-crop augmentation: ``n_global`` global crops then ``n_local`` local crops of one image.

    Each crop: random resized crop (bicubic, antialiased), horizontal flip, colour jitter (DINO's
    brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1: ``color_jitter``) with p = 0.8, grayscale
    with p = 0.2, Gaussian blur (DINO's sigma in [0.1, 2.0] px: ``blur_sigma``) with p = 1.0 on the
    first global crop, 0.1 on the second and 0.5 on local crops (a separable kernel of three sigmas
    each side, see `gaussian_blur`), solarisation (threshold 128) with p = 0.2 (``solarization_prob``)
    on the second global crop only, then conversion to float32 and normalisation. Global crops beyond
    the second reuse the second's recipe.

    The defaults are DINO's (official ``datasets/build.py:203-251``, ``utils.py:47``), tuned for
    224 / 96 px crops of natural images. Crops of another scale or data of another kind may need
    others: a 2 px blur erases 4 px details of a 32 px crop, and solarisation turns light cells dark.

    The random operations run on uint8 tensors (a PIL input is converted first), so PIL and tensor
    inputs of the same pixels follow the same path. See the module docstring for seeding.

    Args:
        global_size: side of the global crops (224).
        local_size: side of the local crops (96).
        n_global: number of global crops (>= 1; 2 in DINO / CMD).
        n_local: number of local crops (>= 0; 8 in DINO / CMD).
        global_scale: area fraction range of the global crops.
        local_scale: area fraction range of the local crops.
        mean, std: per-channel normalisation.
        color_jitter: ``(brightness, contrast, saturation, hue)`` of torchvision's ``ColorJitter``
            (each >= 0, hue <= 0.5: 0.5 draws the hue shift from the whole colour circle).
        blur_sigma: ``(low, high)``: the Gaussian blur's std range in pixels of the output crop.
        solarization_prob: probability of solarising the second global crop, in [0, 1] (0: never).

    Call:
        ``aug(image)`` with a PIL image (any mode) or a uint8 tensor [C, H, W] / [H, W] returns a list of
        ``n_global + n_local`` float32 tensors, globals first: [3, global_size, global_size] x n_global,
        then [3, local_size, local_size] x n_local.

    Example:
        >>> import PIL.Image
        >>> aug = MultiCropAugmentation(global_size=64, local_size=32, n_global=2, n_local=3)
        >>> crops = aug(PIL.Image.new("L", (80, 60)))  # grayscale is fine
        >>> len(crops), crops[0].shape, crops[-1].dtype
        (5, torch.Size([3, 64, 64]), torch.float32)
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_global: int = 2,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: Sequence[float] = DINO_COLOR_JITTER,
        blur_sigma: Sequence[float] = DINO_BLUR_SIGMA,
        solarization_prob: float = DINO_SOLARIZATION_PROB,
    ) -> None:
        self.global_size = _check_size("global_size", global_size)
        self.local_size = _check_size("local_size", local_size)
        self.n_global = _check_size("n_global", n_global)
        if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
            raise ValueError(f"n_local must be a non-negative int, got {n_local!r}")
        self.n_local = n_local
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries (std > 0), got mean={mean!r}, std={std!r}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.color_jitter = _check_color_jitter(color_jitter)
        self.blur_sigma = _check_blur_sigma(blur_sigma)
        if isinstance(solarization_prob, bool) or not 0.0 <= float(solarization_prob) <= 1.0:
            raise ValueError(f"solarization_prob must lie in [0, 1], got {solarization_prob!r}")
        self.solarization_prob = float(solarization_prob)

        self.to_rgb = ToRGBImage()
        finish = _to_float_normalised(self.mean, self.std)
        self.global_first = self._crop(self.global_size, self.global_scale, blur_p=1.0, solarize_p=0.0, finish=finish)
        self.global_other = self._crop(
            self.global_size, self.global_scale, blur_p=0.1, solarize_p=self.solarization_prob, finish=finish
        )
        self.local = self._crop(self.local_size, self.local_scale, blur_p=0.5, solarize_p=0.0, finish=finish)

    def _crop(
        self, size: int, scale: tuple[float, float], *, blur_p: float, solarize_p: float, finish: list
    ) -> v2.Compose:
        brightness, contrast, saturation, hue = self.color_jitter
        steps: list = [
            v2.RandomResizedCrop(
                size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply(
                [v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)], p=0.8
            ),
            v2.RandomGrayscale(p=0.2),
        ]
        if blur_p > 0:
            steps.append(RandomGaussianBlur(p=blur_p, sigma=self.blur_sigma))
        if solarize_p > 0:
            steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
        return v2.Compose(steps + finish)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        rgb = tv_tensors.Image(self.to_rgb(image))
        crops = [self.global_first(rgb)]
        crops += [self.global_other(rgb) for _ in range(self.n_global - 1)]
        crops += [self.local(rgb) for _ in range(self.n_local)]
        return crops

    @property
    def n_crops(self) -> int:
        """``n_global + n_local``."""
        return self.n_global + self.n_local

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
            f"n_global={self.n_global}, n_local={self.n_local}, global_scale={self.global_scale}, "
            f"local_scale={self.local_scale}, color_jitter={self.color_jitter}, blur_sigma={self.blur_sigma}, "
            f"solarization_prob={self.solarization_prob})"
        )


def eval_transform(
    size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Evaluation transform: resize the short side, centre crop, normalise (DINO's k-NN / linear protocol).

    Args:
        size: side of the centre crop (224).
        resize: short side after resizing; default ``round(size * 256 / 224)`` (256 for 224).
        mean, std: per-channel normalisation.

    Returns:
        A callable taking a PIL image (any mode) or a uint8 tensor and returning float32 [3, size, size].

    Example:
        >>> import torch
        >>> eval_transform(32)(torch.zeros(4, 50, 40, dtype=torch.uint8)).shape  # RGBA is fine
        torch.Size([3, 32, 32])
    """
    size = _check_size("size", size)
    resize = _check_size("resize", round(size * 256 / 224) if resize is None else resize)
    if resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size})")
    return v2.Compose(
        [
            ToRGBImage(),
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            *_to_float_normalised(mean, std),
        ]
    )


def multicrop_collate(batch: Sequence[Any]) -> tuple[list[torch.Tensor], Any]:
    """Collate multi-crop samples into one batch per crop position.

    Items are ``(crops, label)`` (or ``(crops, label, ...)``), where ``crops`` is the list returned by
    [`MultiCropAugmentation`][cmd.transforms.MultiCropAugmentation], or just ``crops``.

    Returns:
        ``(crops, labels)``: ``crops`` a list of ``n_crops`` tensors [B, 3, H_c, W_c] (crop ``c`` of every
        item, globals first); ``labels`` the default-collated labels (a [B] tensor for int labels), or
        None for items that are just crops. Items with more fields give ``(crops, labels, *rest)``.

    Example:
        >>> import torch
        >>> item = ([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)], 1)
        >>> crops, labels = multicrop_collate([item, item])
        >>> [tuple(c.shape) for c in crops], labels
        ([(2, 3, 8, 8), (2, 3, 4, 4)], tensor([1, 1]))
    """
    if len(batch) == 0:
        raise ValueError("multicrop_collate got an empty batch")

    def split(item: Any) -> tuple[Sequence[torch.Tensor], tuple]:
        if isinstance(item, (list, tuple)) and len(item) > 0 and isinstance(item[0], torch.Tensor):
            return item, ()
        if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], (list, tuple)):
            return item[0], tuple(item[1:])
        raise TypeError(
            f"each item must be a list of crop tensors or a tuple (crops, label, ...), got {type(item).__name__}"
        )

    parts = [split(item) for item in batch]
    n_crops = len(parts[0][0])
    n_extra = len(parts[0][1])
    for i, (crops, extra) in enumerate(parts):
        if len(crops) != n_crops or len(extra) != n_extra:
            raise ValueError(
                f"item {i} has {len(crops)} crops and {len(extra)} extra fields, "
                f"item 0 has {n_crops} crops and {n_extra} extra fields"
            )
    stacked = []
    for c in range(n_crops):
        shapes = {tuple(crops[c].shape) for crops, _ in parts}
        if len(shapes) != 1:
            raise ValueError(f"crop {c} has different shapes across the batch: {sorted(shapes)}")
        stacked.append(torch.stack([crops[c] for crops, _ in parts]))
    if n_extra == 0:
        return stacked, None
    extras = [default_collate([extra[j] for _, extra in parts]) for j in range(n_extra)]
    return (stacked, *extras)
