"""A procedurally generated fine-grained dataset: classes differ only in a small local part.

Every image shows one object (a shaded, textured ellipse) on a cluttered background. Everything
global is drawn from the same distribution for every class: background colours and clutter, the
object's colour, position, size, elongation and orientation (pose), pixel noise. The only thing that
depends on the class is a small square *part* on the object, at the end of its major axis (so it
moves and turns with the pose): a 4 x 4 binary pattern of light and dark cells, one pattern per
class, with the same number of light cells in every pattern (so even the part's mean colour carries
no class information). The part covers at most 4 % of the image.

Every image is a pure function of ``(seed, split, index)``; the class patterns depend on ``seed``
only, so the train and test splits share them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

__all__ = ["DIFFICULTIES", "SyntheticFineGrained", "SyntheticSample"]

_SPLITS = {"train": 0, "test": 1, "val": 2}
_CODE_SIDE = 4  # the part pattern is a 4 x 4 grid of cells (difficulty "hard")
_PART_FRACTION = 0.2  # part side / image side: area <= 4 % (difficulty "hard")
# difficulty presets: (part_fraction, code_side, class_hue, clutter); explicit arguments override them
DIFFICULTIES: dict[str, dict[str, float | int]] = {
    "hard": {"part_fraction": _PART_FRACTION, "code_side": _CODE_SIDE, "class_hue": 0.0, "clutter": 1.0},
    "medium": {"part_fraction": 0.3, "code_side": 3, "class_hue": 0.0, "clutter": 1.0},
    "easy": {"part_fraction": 0.4, "code_side": 3, "class_hue": 0.0, "clutter": 1.0},
    "demo": {"part_fraction": 0.4, "code_side": 3, "class_hue": 0.0, "clutter": 0.0},
}
_CLASS_STREAM = 0x5EED  # separates the class-pattern generator from the per-image ones


class SyntheticSample(NamedTuple):
    """One rendered image: ``image`` uint8 [H, W, 3], ``part_mask`` bool [H, W], ``label``."""

    image: np.ndarray
    part_mask: np.ndarray
    label: int


def _class_codes(n_classes: int, seed: int, side: int = _CODE_SIDE) -> np.ndarray:
    """[n_classes, side, side] bool patterns with side^2 // 2 light cells each, pairwise as different as possible."""
    n_cells = side * side
    max_codes = math.comb(n_cells, n_cells // 2)
    if n_classes > max_codes:
        raise ValueError(f"n_classes must be at most {max_codes} for {side} x {side} part cells, got {n_classes}")
    rng = np.random.default_rng([seed, _CLASS_STREAM])
    pool_size = max(4 * n_classes, 512)
    pool = np.zeros((pool_size, n_cells), dtype=bool)
    ones = rng.permuted(np.tile(np.arange(n_cells), (pool_size, 1)), axis=1)[:, : n_cells // 2]
    np.put_along_axis(pool, ones, True, axis=1)
    pool = np.unique(pool, axis=0)
    pool = pool[rng.permutation(len(pool))]
    chosen: list[np.ndarray] = []
    distances = range(2 * (n_cells // 4), 0, -2) if n_cells >= 4 else (1,)  # 4 x 4 cells: 8, 6, 4, 2
    for min_distance in distances:  # greedy: prefer codes far apart, relax when short
        for code in pool:
            if len(chosen) == n_classes:
                break
            if all(np.count_nonzero(code != c) >= min_distance for c in chosen):
                chosen.append(code)
        if len(chosen) == n_classes:
            break
    while len(chosen) < n_classes:  # only for very many classes: any unused balanced code
        code = np.zeros(n_cells, dtype=bool)
        code[rng.choice(n_cells, n_cells // 2, replace=False)] = True
        if not any(np.array_equal(code, c) for c in chosen):
            chosen.append(code)
    return np.stack(chosen).reshape(n_classes, side, side)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns [..., 3]."""
    k = (np.stack([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


class SyntheticFineGrained(Dataset):
    """Deterministic synthetic fine-grained images; no files, no network.

    A sample is ``(image, label)``, or ``(image, label, part_mask)`` with ``return_part_mask``.
    ``image`` is a PIL RGB image of ``image_size`` x ``image_size`` pixels, like torchvision's
    datasets (so the same transforms work for it and for CUB), or ``transform(image)`` when a
    transform is given (e.g. ``cmd.MultiCropAugmentation`` or ``torchvision.transforms.ToTensor()``).
    ``part_mask`` is a bool tensor [H, W] in the frame of the *untransformed* image: a resize keeps
    it valid for [`cmd.eval.part_weight_mass`][cmd.eval.part_weight_mass], a crop or flip does not.

    The samples are sorted by class: index ``i`` has label ``i // n_per_class``.

    Args:
        n_classes: number of classes (their patterns differ in at least 2 of the 16 cells, usually
            far more).
        n_per_class: images per class in this split.
        image_size: side in pixels (>= 16; the part is ``floor(0.2 * image_size)`` pixels wide).
        split: ``"train"``, ``"test"`` or ``"val"`` (different images, the same classes).
        seed: the dataset's seed.
        return_part_mask: also return the part mask.
        transform: applied to the PIL image.
        target_transform: applied to the label.
        cache: keep rendered images in memory (about 3 * image_size^2 bytes each).
        difficulty: a preset of the four knobs below: ``"hard"`` (the default; the method's
            benchmark: a 4 x 4 pattern in a part of 0.2 x the image side, no global cue, full
            clutter), ``"medium"`` (a 3 x 3 pattern in a part of 0.3 x the side, full clutter: at
            32 px a random-init k-NN is near chance, 13-15 % for 10 classes, and the demo's
            backbone trained with labels for 620 steps reaches 91-96 %; see docs/examples.md),
            ``"easy"`` (a part twice as wide with 3 x 3 larger cells, which a tiny
            backbone can learn with labels in a few CPU minutes) or ``"demo"`` (``"easy"`` without
            clutter and with a calm background: what self-supervision learns visibly in the CPU
            demo's budget; see ``DIFFICULTIES`` and docs/learning_regime.md).
        part_fraction: part side / image side, in (0, 1] (overrides the preset).
        code_side: the part pattern is ``code_side x code_side`` cells, >= 2 (overrides the preset).
        class_hue: in [0, 1]; 0: the object's hue is random, as every other global property; s > 0:
            the hue centres on a per-class hue, with uniform noise of width ``1 - s`` (a global,
            class-correlated cue, like the colour family of a species; overrides the preset).
        clutter: in [0, 1]: the strength of the class-independent nuisance that survives
            augmentation: the number of clutter shapes (3-6 at 1, none at 0) and the spread of the
            background colours around mid-grey (overrides the preset; 1 is the original scene).

    Attributes:
        num_classes: the number of classes.
        classes: the class names.
        targets: the label of every index.
        part_size: the side of the part in pixels.
        difficulty, part_fraction, code_side, class_hue, clutter: the data's settings.

    Example:
        >>> data = SyntheticFineGrained(n_classes=4, n_per_class=5, image_size=64)
        >>> image, label = data[7]
        >>> image.size, label, len(data)
        ((64, 64), 1, 20)
    """

    def __init__(
        self,
        n_classes: int = 10,
        n_per_class: int = 50,
        image_size: int = 64,
        split: str = "train",
        seed: int = 0,
        return_part_mask: bool = False,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        cache: bool = True,
        difficulty: str = "hard",
        part_fraction: float | None = None,
        code_side: int | None = None,
        class_hue: float | None = None,
        clutter: float | None = None,
    ) -> None:
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
        preset = DIFFICULTIES[difficulty]
        part_fraction = float(preset["part_fraction"] if part_fraction is None else part_fraction)
        code_side = int(preset["code_side"] if code_side is None else code_side)
        class_hue = float(preset["class_hue"] if class_hue is None else class_hue)
        clutter = float(preset["clutter"] if clutter is None else clutter)
        if not 0.0 < part_fraction <= 1.0:
            raise ValueError(f"part_fraction must lie in (0, 1], got {part_fraction}")
        if code_side < 2:
            raise ValueError(f"code_side must be >= 2, got {code_side}")
        if not 0.0 <= class_hue <= 1.0:
            raise ValueError(f"class_hue must lie in [0, 1], got {class_hue}")
        if not 0.0 <= clutter <= 1.0:
            raise ValueError(f"clutter must lie in [0, 1], got {clutter}")
        for name, value, low in (("n_classes", n_classes, 1), ("n_per_class", n_per_class, 1), ("image_size", image_size, 16)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.n_classes = n_classes
        self.n_per_class = n_per_class
        self.image_size = image_size
        self.split = split
        self.seed = seed
        self.return_part_mask = return_part_mask
        self.transform = transform
        self.target_transform = target_transform
        self.cache = cache
        self.difficulty, self.part_fraction, self.code_side, self.class_hue = difficulty, part_fraction, code_side, class_hue
        self.clutter = clutter
        self.part_size = int(part_fraction * image_size)
        if self.part_size < 1:
            raise ValueError(f"the part ({part_fraction} x {image_size} px) must be at least 1 pixel wide")
        self.classes = [f"class_{c:0{len(str(n_classes - 1))}d}" for c in range(n_classes)]
        self.targets = [i // n_per_class for i in range(n_classes * n_per_class)]
        self._codes = _class_codes(n_classes, seed, code_side)
        ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / image_size
        self._ys, self._xs = ys, xs  # pixel coordinates in [0, 1)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.n_classes

    def __len__(self) -> int:
        return self.n_classes * self.n_per_class

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_classes={self.n_classes}, n_per_class={self.n_per_class}, "
            f"image_size={self.image_size}, split={self.split!r}, seed={self.seed}, difficulty={self.difficulty!r}, "
            f"part_fraction={self.part_fraction}, code_side={self.code_side}, class_hue={self.class_hue}, "
            f"clutter={self.clutter})"
        )

    def _index(self, index: int) -> int:
        if isinstance(index, torch.Tensor):
            index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return index % len(self)

    def render(self, index: int, label: int | None = None) -> SyntheticSample:
        """Render image ``index`` as arrays; ``label`` overrides the class of its part.

        With another ``label`` the very same scene is drawn with that class's part pattern: the two
        images differ only inside the part mask.

        Returns:
            SyntheticSample(image uint8 [H, W, 3], part_mask bool [H, W], label).
        """
        index = self._index(index)
        label = self.targets[index] if label is None else int(label)
        if not 0 <= label < self.n_classes:
            raise ValueError(f"label must lie in [0, {self.n_classes}), got {label}")
        if self.cache and label == self.targets[index] and index in self._cache:
            image, mask = self._cache[index]
            return SyntheticSample(image, mask, label)
        image, mask = self._draw(index, label)
        if self.cache and label == self.targets[index]:
            self._cache[index] = (image, mask)
        return SyntheticSample(image, mask, label)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All images at once: (images uint8 [N, H, W, 3], part masks bool [N, H, W], labels int64 [N])."""
        samples = [self.render(i) for i in range(len(self))]
        return (
            np.stack([s.image for s in samples]),
            np.stack([s.part_mask for s in samples]),
            np.asarray(self.targets, dtype=np.int64),
        )

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        image, mask, label = self.render(index)
        out_image: Any = PIL.Image.fromarray(image)
        if self.transform is not None:
            out_image = self.transform(out_image)
        target: Any = label if self.target_transform is None else self.target_transform(label)
        if self.return_part_mask:
            return out_image, target, torch.from_numpy(mask.copy())
        return out_image, target

    def _window(self, cy: float, cx: float, radius: float) -> tuple[slice, slice]:
        """Pixel slices of the square of half-side ``radius`` around (cy, cx), all in [0, 1] units."""
        size = self.image_size
        top, bottom = max(0, int((cy - radius) * size)), min(size, int((cy + radius) * size) + 2)
        left, right = max(0, int((cx - radius) * size)), min(size, int((cx + radius) * size) + 2)
        return slice(top, max(top, bottom)), slice(left, max(left, right))

    def _draw(self, index: int, label: int) -> tuple[np.ndarray, np.ndarray]:
        """The scene of ``index`` (independent of the label) with the part of class ``label``."""
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        size, ys, xs = self.image_size, self._ys, self._xs

        # background: a colour gradient in a random direction plus low-frequency waves
        c0, c1 = rng.uniform(0.15, 0.85, size=(2, 3)).astype(np.float32)
        if self.clutter < 1.0:  # a calmer background: colours pulled towards mid-grey
            c0, c1 = 0.5 + self.clutter * (c0 - 0.5), 0.5 + self.clutter * (c1 - 0.5)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = np.clip(0.5 + (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle), 0, 1)[..., None]
        image = c0 + (c1 - c0) * ramp
        freq = [float(f) for f in rng.uniform(2, 6, size=2)]
        phase = [float(f) for f in rng.uniform(0, 2 * math.pi, size=2)]
        waves = 0.06 * np.sin(2 * math.pi * freq[0] * xs + phase[0]) * np.cos(2 * math.pi * freq[1] * ys + phase[1])
        image = image + waves[..., None]

        # clutter: plain-coloured discs and boxes
        for _ in range(int(round(int(rng.integers(3, 7)) * self.clutter))):
            cy, cx = (float(t) for t in rng.uniform(0, 1, size=2))
            radius = rng.uniform(0.04, 0.12)
            colour = rng.uniform(0, 1, size=3).astype(np.float32)
            rows, cols = self._window(cy, cx, 2 * radius)
            if rng.uniform() < 0.5:
                shape = (ys[rows, cols] - cy) ** 2 + (xs[rows, cols] - cx) ** 2 < radius**2
            else:
                half_width = radius * rng.uniform(0.5, 2.0)
                shape = (np.abs(ys[rows, cols] - cy) < radius) & (np.abs(xs[rows, cols] - cx) < half_width)
            image[rows, cols][shape] = colour

        # the object: a shaded, textured ellipse with random pose
        a = rng.uniform(0.22, 0.32)  # semi-major axis (fraction of the image side)
        b = a * rng.uniform(0.55, 0.8)
        theta = rng.uniform(0, 2 * math.pi)
        oy, ox = (float(t) for t in rng.uniform(a + 0.02, 1 - a - 0.02, size=2))
        hue = rng.uniform()
        if self.class_hue > 0:  # a class-correlated hue: the class's centre plus noise of width 1 - class_hue
            hue = (label / self.n_classes + (1.0 - self.class_hue) * (hue - 0.5)) % 1.0
        body = _hsv_to_rgb(
            np.float32(hue), np.float32(rng.uniform(0.3, 0.8)), np.float32(rng.uniform(0.45, 0.9))
        ).astype(np.float32)
        stripe_freq, stripe_phase = rng.uniform(4, 9), rng.uniform(0, 2 * math.pi)
        rows, cols = self._window(oy, ox, a)
        dx, dy = xs[rows, cols] - ox, ys[rows, cols] - oy
        u = dx * math.cos(theta) + dy * math.sin(theta)  # along the major axis
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        shading = 0.8 + 0.25 * (v / b) + 0.05 * np.sin(2 * math.pi * stripe_freq * u + stripe_phase)
        window = image[rows, cols]
        window[inside] = body * shading[inside][:, None]

        # pixel noise
        image += 0.03 * rng.standard_normal(size=image.shape, dtype=np.float32)

        # the part: a square at the end of the major axis, the only class-dependent pixels
        p = self.part_size
        centre_x = ox + 0.6 * a * math.cos(theta)
        centre_y = oy + 0.6 * a * math.sin(theta)
        top = int(np.clip(round(centre_y * size - p / 2), 0, size - p))
        left = int(np.clip(round(centre_x * size - p / 2), 0, size - p))
        light = rng.uniform(0.75, 1.0, size=3).astype(np.float32)
        dark = rng.uniform(0.0, 0.2, size=3).astype(np.float32)
        cells = (np.arange(p) * self.code_side) // p  # pixel -> cell, nearest
        pattern = self._codes[label][cells[:, None], cells[None, :]]  # [p, p] bool
        image[top : top + p, left : left + p] = np.where(pattern[..., None], light, dark)
        mask = np.zeros((size, size), dtype=bool)
        mask[top : top + p, left : left + p] = True

        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mask
