"""Multi-crop augmentation, evaluation transform and collate: counts, order, sizes, dtypes, seeding, modes."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from cmd.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    RandomGaussianBlur,
    ToRGBImage,
    eval_transform,
    gaussian_blur,
    multicrop_collate,
)

SMALL = {"global_size": 32, "local_size": 16}


def _image(h=40, w=50, channels=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=g, dtype=torch.uint8)


def test_number_order_sizes_dtypes():
    aug = MultiCropAugmentation(n_global=2, n_local=3, **SMALL)
    crops = aug(_image())
    assert len(crops) == aug.n_crops == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in crops)
    # normalised: values lie in [(0 - mean) / std, (1 - mean) / std]
    lo = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1, 1)
    for c in crops:
        assert torch.all(c >= lo - 1e-5) and torch.all(c <= hi + 1e-5)
    assert len(MultiCropAugmentation(n_global=3, n_local=0, **SMALL)(_image())) == 3


def test_default_recipe_sizes():
    crops = MultiCropAugmentation()(_image(120, 100))
    assert [tuple(c.shape[-2:]) for c in crops] == [(224, 224)] * 2 + [(96, 96)] * 8


def test_recipe_per_crop_kind():
    aug = MultiCropAugmentation(**SMALL)

    def kinds(pipeline):
        return [type(t).__name__ for t in pipeline.transforms]

    def blur_p(pipeline):
        return next(t.p for t in pipeline.transforms if isinstance(t, RandomGaussianBlur))

    assert blur_p(aug.global_first) == 1.0 and blur_p(aug.global_other) == 0.1 and blur_p(aug.local) == 0.5
    assert "RandomSolarize" in kinds(aug.global_other)
    assert "RandomSolarize" not in kinds(aug.global_first) and "RandomSolarize" not in kinds(aug.local)
    solarize = next(t for t in aug.global_other.transforms if isinstance(t, v2.RandomSolarize))
    assert (solarize.p, solarize.threshold) == (0.2, 128)
    jitter = next(t for t in aug.local.transforms if isinstance(t, v2.RandomApply))
    assert jitter.p == 0.8
    rrc = aug.global_first.transforms[0]
    assert isinstance(rrc, v2.RandomResizedCrop) and rrc.scale == (0.4, 1.0)
    assert aug.local.transforms[0].scale == (0.05, 0.4)


def test_deterministic_under_seed():
    aug = MultiCropAugmentation(n_local=2, **SMALL)
    image = _image()
    torch.manual_seed(123)
    a = aug(image)
    torch.manual_seed(123)
    b = aug(image)
    torch.manual_seed(124)
    c = aug(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_pil_and_tensor_inputs_agree():
    aug = MultiCropAugmentation(n_local=2, **SMALL)
    image = _image()
    pil = PIL.Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")
    torch.manual_seed(5)
    a = aug(image)
    torch.manual_seed(5)
    b = aug(pil)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "1", "I"])
def test_pil_modes_become_rgb(mode):
    rgb = PIL.Image.fromarray(_image().permute(1, 2, 0).numpy(), mode="RGB")
    image = rgb.convert(mode)
    crops = MultiCropAugmentation(n_local=1, **SMALL)(image)
    assert [c.shape[0] for c in crops] == [3, 3, 3]
    assert eval_transform(32)(image).shape == (3, 32, 32)


def test_tensor_channel_conversion():
    to_rgb = ToRGBImage()
    gray = _image(channels=1)
    out = to_rgb(gray)
    assert out.shape == (3, 40, 50) and all(torch.equal(out[i], gray[0]) for i in range(3))
    assert torch.equal(to_rgb(gray[0]), out)  # [H, W]
    rgba = _image(channels=4)
    assert torch.equal(to_rgb(rgba), rgba[:3])  # alpha dropped, as PIL's convert("RGB")
    assert torch.equal(to_rgb(_image(channels=2)), to_rgb(_image(channels=2)[:1]))
    pil_rgba = PIL.Image.fromarray(rgba.permute(1, 2, 0).numpy(), mode="RGBA")
    assert torch.equal(to_rgb(pil_rgba), rgba[:3])
    with pytest.raises(TypeError, match="uint8"):
        to_rgb(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match=r"\(5, 4, 4\)"):
        to_rgb(torch.zeros(5, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="ndarray"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))


def test_gaussian_blur_matches_2d_convolution_loop():
    image = _image(9, 11)
    sigma = 0.8
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    f = image.double()
    want = torch.zeros_like(f)
    h, w = f.shape[-2:]

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    for c in range(3):
        for i in range(h):
            for j in range(w):
                acc = 0.0
                for di in range(-radius, radius + 1):
                    for dj in range(-radius, radius + 1):
                        acc += (
                            k1[di + radius] * k1[dj + radius] * f[c, reflect(i + di, h), reflect(j + dj, w)]
                        )
                want[c, i, j] = acc
    got = gaussian_blur(image, sigma)
    assert got.dtype == torch.uint8
    assert (got.double() - want.round()).abs().max() <= 1  # rounding of float32 vs float64 sums
    float_got = gaussian_blur(image.float(), sigma)
    torch.testing.assert_close(float_got.double(), want, rtol=0, atol=1e-3)
    assert torch.equal(gaussian_blur(image[:, :1, :1], 2.0), image[:, :1, :1])  # too small to blur


def _jitter(pipeline) -> v2.ColorJitter:
    return next(t for t in pipeline.transforms if isinstance(t, v2.RandomApply)).transforms[0]


def test_photometric_defaults_are_dinos():
    aug = MultiCropAugmentation(**SMALL)
    for pipeline in (aug.global_first, aug.global_other, aug.local):
        jitter = _jitter(pipeline)
        assert (jitter.brightness, jitter.contrast, jitter.saturation) == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2))
        assert jitter.hue == (-0.1, 0.1)
        assert next(t for t in pipeline.transforms if isinstance(t, RandomGaussianBlur)).sigma == (0.1, 2.0)


def test_photometric_options_reach_every_crop():
    aug = MultiCropAugmentation(**SMALL, color_jitter=(0.1, 0.0, 0.3, 0.5), blur_sigma=(0.02, 0.3),
                                solarization_prob=0.0)
    for pipeline in (aug.global_first, aug.global_other, aug.local):
        jitter = _jitter(pipeline)
        assert jitter.brightness == (0.9, 1.1) and jitter.contrast is None and jitter.saturation == (0.7, 1.3)
        assert jitter.hue == (-0.5, 0.5)  # the whole colour circle
        assert next(t for t in pipeline.transforms if isinstance(t, RandomGaussianBlur)).sigma == (0.02, 0.3)
        assert not any(isinstance(t, v2.RandomSolarize) for t in pipeline.transforms)
    solarized = MultiCropAugmentation(**SMALL, solarization_prob=1.0)
    assert next(t for t in solarized.global_other.transforms if isinstance(t, v2.RandomSolarize)).p == 1.0
    assert "color_jitter=(0.1, 0.0, 0.3, 0.5)" in repr(aug) and "solarization_prob=0.0" in repr(aug)


def test_solarization_prob_one_solarizes_the_second_global_crop():
    # a flat bright image: solarisation (threshold 128) maps 200 to 55; jitter, grayscale and blur keep it flat
    image = torch.full((3, 20, 20), 200, dtype=torch.uint8)
    plain = dict(**SMALL, n_local=0, color_jitter=(0, 0, 0, 0), mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(0)
    first, second = MultiCropAugmentation(**plain, solarization_prob=1.0)(image)
    assert torch.allclose(first, torch.full_like(first, 200 / 255), atol=2 / 255)
    assert torch.allclose(second, torch.full_like(second, 55 / 255), atol=2 / 255)
    torch.manual_seed(0)
    _, kept = MultiCropAugmentation(**plain, solarization_prob=0.0)(image)
    assert torch.allclose(kept, torch.full_like(kept, 200 / 255), atol=2 / 255)


@pytest.mark.parametrize("kwargs, match", [
    ({"color_jitter": (0.4, 0.4, 0.2)}, "color_jitter"),
    ({"color_jitter": (0.4, 0.4, 0.2, 0.6)}, "hue <= 0.5"),
    ({"color_jitter": (-0.1, 0.4, 0.2, 0.1)}, "color_jitter"),
    ({"color_jitter": (float("nan"), 0.4, 0.2, 0.1)}, "color_jitter"),
    ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
    ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
    ({"blur_sigma": (0.1, float("inf"))}, "blur_sigma"),
    ({"solarization_prob": 1.5}, "solarization_prob"),
    ({"solarization_prob": True}, "solarization_prob"),
])
def test_bad_photometric_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropAugmentation(**SMALL, **kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="global_size"):
        MultiCropAugmentation(global_size=0)
    with pytest.raises(ValueError, match="n_local"):
        MultiCropAugmentation(n_local=-1)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="resize"):
        eval_transform(224, resize=200)


def test_eval_transform_is_resize_center_crop_normalise():
    image = _image(60, 80)
    got = eval_transform(size=28, resize=32)(image)
    resized = v2.functional.resize(image, [32], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    assert tuple(resized.shape) == (3, 32, 42)
    top, left = (32 - 28) // 2, (42 - 28) // 2
    crop = resized[:, top : top + 28, left : left + 28].float() / 255
    want = (crop - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert eval_transform().transforms[1].size == [256]


class _Images(Dataset):
    def __init__(self, n, aug, with_labels=True):
        self.images = [_image(seed=i) for i in range(n)]
        self.aug, self.with_labels = aug, with_labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        crops = self.aug(self.images[i])
        return (crops, i % 3) if self.with_labels else crops


def test_collate_in_a_dataloader():
    aug = MultiCropAugmentation(n_local=2, **SMALL)
    loader = DataLoader(_Images(5, aug), batch_size=4, collate_fn=multicrop_collate)
    crops, labels = next(iter(loader))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert torch.equal(labels, torch.tensor([0, 1, 2, 0]))
    crops, labels = next(
        iter(DataLoader(_Images(3, aug, with_labels=False), batch_size=3, collate_fn=multicrop_collate))
    )
    assert labels is None and len(crops) == 4 and crops[0].shape == (3, 3, 32, 32)


def test_collate_rows_and_errors():
    items = [
        ([torch.full((3, 4, 4), float(i)), torch.full((3, 2, 2), -float(i))], i, f"id{i}") for i in range(3)
    ]
    crops, labels, ids = multicrop_collate(items)
    for i in range(3):  # row i of crop c is crop c of item i
        assert torch.all(crops[0][i] == i) and torch.all(crops[1][i] == -i)
    assert torch.equal(labels, torch.tensor([0, 1, 2])) and ids == ["id0", "id1", "id2"]
    with pytest.raises(ValueError, match="empty"):
        multicrop_collate([])
    with pytest.raises(ValueError, match="item 1 has 1 crops"):
        multicrop_collate([items[0], ([torch.zeros(3, 4, 4)], 1, "x")])
    with pytest.raises(ValueError, match="crop 0 has different shapes"):
        multicrop_collate([([torch.zeros(3, 4, 4)], 0), ([torch.zeros(3, 5, 5)], 1)])
    with pytest.raises(TypeError, match="item"):
        multicrop_collate([5])


def test_dataloader_workers_are_reproducible_with_a_seeded_generator():
    aug = MultiCropAugmentation(n_local=1, **SMALL)
    data = _Images(4, aug)

    def first_batch(seed):
        loader = DataLoader(
            data,
            batch_size=2,
            num_workers=1,
            collate_fn=multicrop_collate,
            generator=torch.Generator().manual_seed(seed),
        )
        return next(iter(loader))[0]

    a, b, c = first_batch(7), first_batch(7), first_batch(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
