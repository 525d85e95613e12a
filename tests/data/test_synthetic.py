"""SyntheticFineGrained: deterministic, fast, and fine-grained (only a small part tells classes apart)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from cmd.data import SyntheticFineGrained


def test_sizes_labels_and_attributes():
    data = SyntheticFineGrained(n_classes=4, n_per_class=3, image_size=48)
    assert len(data) == 12 and data.num_classes == 4
    assert data.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert data.classes == ["class_0", "class_1", "class_2", "class_3"]
    image, label = data[4]
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (48, 48)
    assert label == 1
    assert data[-1][1] == 3
    with pytest.raises(IndexError, match="out of range"):
        data[12]


def test_transform_and_part_mask():
    data = SyntheticFineGrained(
        n_classes=3, n_per_class=2, image_size=40, return_part_mask=True,
        transform=lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1), target_transform=lambda y: y + 10,
    )
    image, label, mask = data[3]
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8
    assert label == 11
    assert mask.shape == (40, 40) and mask.dtype == torch.bool
    part = data.part_size
    assert part == 8 and int(mask.sum()) == part * part  # a square part
    rows, cols = mask.nonzero(as_tuple=True)
    assert int(rows.max() - rows.min()) == part - 1 and int(cols.max() - cols.min()) == part - 1


@pytest.mark.parametrize("size", [16, 64, 100, 224])
def test_part_covers_under_five_percent(size):
    data = SyntheticFineGrained(n_classes=2, n_per_class=2, image_size=size)
    _, masks, _ = data.to_arrays()
    assert (masks.sum(axis=(1, 2)) / size**2 < 0.05).all()
    assert (masks.sum(axis=(1, 2)) > 0).all()


def test_deterministic_per_seed_split_and_index():
    a = SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=32, seed=1)
    b = SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=32, seed=1, cache=False)
    images_a, masks_a, labels_a = a.to_arrays()
    images_b, masks_b, labels_b = b.to_arrays()
    assert np.array_equal(images_a, images_b) and np.array_equal(masks_a, masks_b)
    assert np.array_equal(labels_a, labels_b)
    # access order does not matter: an index renders the same alone
    assert np.array_equal(SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=32, seed=1).render(7).image,
                          images_a[7])
    other_seed = SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=32, seed=2).to_arrays()[0]
    other_split = SyntheticFineGrained(n_classes=3, n_per_class=4, image_size=32, seed=1, split="test").to_arrays()[0]
    assert not np.array_equal(images_a, other_seed)
    assert not np.array_equal(images_a, other_split)
    # the class patterns are shared by the splits of one seed
    assert np.array_equal(a._codes, SyntheticFineGrained(n_classes=3, seed=1, split="test")._codes)


def test_classes_differ_only_inside_the_part():
    data = SyntheticFineGrained(n_classes=5, n_per_class=2, image_size=64)
    for index in range(0, 10, 3):
        own = data.render(index)
        for label in range(5):
            other = data.render(index, label=label)
            outside = ~own.part_mask
            assert np.array_equal(own.image[outside], other.image[outside])
            assert np.array_equal(own.part_mask, other.part_mask)
            if label != own.label:
                assert not np.array_equal(own.image[own.part_mask], other.image[own.part_mask])
    codes = data._codes.reshape(5, -1)
    assert (codes.sum(axis=1) == 8).all()  # the same number of light cells: no mean-colour cue
    assert len({c.tobytes() for c in codes}) == 5


def _ridge_accuracy(train_x, train_y, test_x, test_y, n_classes, alpha=10.0):
    """One-vs-all ridge regression in closed (dual) form, on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    targets = np.eye(n_classes)[train_y]
    dual = np.linalg.solve(train_x @ train_x.T + alpha * np.eye(len(train_x)), targets)
    scores = test_x @ (train_x.T @ dual)
    return float((scores.argmax(1) == test_y).mean())


def _part_crops(images, masks):
    crops = []
    for image, mask in zip(images, masks):
        rows, cols = np.nonzero(mask)
        crops.append(image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].reshape(-1))
    return np.stack(crops).astype(np.float64) / 255


def test_the_task_is_fine_grained():
    """A linear classifier on whole images is near chance; on the part crop it is near perfect."""
    kwargs = {"n_classes": 5, "n_per_class": 40, "image_size": 64, "seed": 0}
    train_images, train_masks, train_y = SyntheticFineGrained(split="train", **kwargs).to_arrays()
    test_images, test_masks, test_y = SyntheticFineGrained(split="test", **kwargs).to_arrays()
    whole = _ridge_accuracy(
        train_images.reshape(len(train_y), -1) / 255.0, train_y, test_images.reshape(len(test_y), -1) / 255.0, test_y, 5
    )
    part = _ridge_accuracy(_part_crops(train_images, train_masks), train_y, _part_crops(test_images, test_masks),
                           test_y, 5)
    assert part > 0.9
    assert whole < 0.4  # chance is 0.2
    assert part - whole > 0.5


def test_argument_errors():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticFineGrained(image_size=8)
    with pytest.raises(ValueError, match="split"):
        SyntheticFineGrained(split="validation")
    with pytest.raises(ValueError, match="n_classes"):
        SyntheticFineGrained(n_classes=0)
    with pytest.raises(ValueError, match="label"):
        SyntheticFineGrained(n_classes=2, n_per_class=1).render(0, label=2)


# ----------------------------------------------------------------------------------- difficulty

# sha256 of (images, part masks) of the "hard" data as rendered before the difficulty setting existed
_HARD_DIGESTS = {
    (10, 4, 64, "train", 0): "b91a3994f18de1c4ceb102ba1f915c55a8c3e41c5c00a3fa3a0d47ca285f4776",
    (5, 3, 48, "test", 3): "cedd3ec2731729076624b5344b6e45dc260462d4cd040e65ebc3530eabaa177d",
}


@pytest.mark.parametrize("key", sorted(_HARD_DIGESTS))
@pytest.mark.parametrize("explicit", [False, True])
def test_hard_is_bit_identical_to_the_original_images(key, explicit):
    import hashlib

    n_classes, n_per_class, size, split, seed = key
    kwargs = dict(difficulty="hard", part_fraction=0.2, code_side=4, class_hue=0.0) if explicit else {}
    data = SyntheticFineGrained(n_classes=n_classes, n_per_class=n_per_class, image_size=size, split=split,
                                seed=seed, **kwargs)
    images, masks, _ = data.to_arrays()
    assert hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest() == _HARD_DIGESTS[key]


def test_easy_preset_is_deterministic_with_a_larger_part():
    a = SyntheticFineGrained(n_classes=10, n_per_class=3, image_size=64, difficulty="easy")
    b = SyntheticFineGrained(n_classes=10, n_per_class=3, image_size=64, difficulty="easy", cache=False)
    hard = SyntheticFineGrained(n_classes=10, n_per_class=3, image_size=64)
    images_a, masks_a, _ = a.to_arrays()
    images_b, masks_b, _ = b.to_arrays()
    assert np.array_equal(images_a, images_b) and np.array_equal(masks_a, masks_b)
    assert a.part_size > hard.part_size and a._codes.shape == (10, a.code_side, a.code_side)
    assert (masks_a.sum(axis=(1, 2)) == a.part_size**2).all()
    assert not np.array_equal(images_a, hard.to_arrays()[0])


# the "medium" preset as calibrated (docs/examples.md): a change to it invalidates the calibration
_MEDIUM_DIGEST = "d3cc9e26c32a30712cba66f6fdbf934f5c581307801057f7e7155ccfb39fa78b"  # 3 classes x 2, 32 px, seed 0


def test_medium_preset_is_deterministic_and_pinned():
    import hashlib

    a = SyntheticFineGrained(n_classes=3, n_per_class=2, image_size=32, difficulty="medium")
    b = SyntheticFineGrained(n_classes=3, n_per_class=2, image_size=32, difficulty="medium", cache=False)
    assert (a.part_fraction, a.code_side, a.class_hue, a.clutter) == (0.3, 3, 0.0, 1.0)
    images, masks, _ = a.to_arrays()
    images_b, masks_b, _ = b.to_arrays()
    assert np.array_equal(images, images_b) and np.array_equal(masks, masks_b)
    assert hashlib.sha256(images.tobytes() + masks.tobytes()).hexdigest() == _MEDIUM_DIGEST
    assert (masks.sum(axis=(1, 2)) == int(0.3 * 32) ** 2).all()


def test_medium_class_signal_sits_in_the_part():
    """Medium at 32 px: with the part blanked a linear classifier is at chance; on the part crop it is far above."""
    kwargs = {"n_classes": 10, "n_per_class": 30, "image_size": 32, "seed": 0, "difficulty": "medium"}
    train_images, train_masks, train_y = SyntheticFineGrained(split="train", **kwargs).to_arrays()
    test_images, test_masks, test_y = SyntheticFineGrained(split="test", **kwargs).to_arrays()

    def blanked(images, masks):
        out = images.astype(np.float64) / 255.0
        out[masks] = 0.5  # the part's pixels replaced by mid-grey: everything else of the scene is kept
        return out.reshape(len(images), -1)

    without_part = _ridge_accuracy(blanked(train_images, train_masks), train_y, blanked(test_images, test_masks),
                                   test_y, 10)
    part_only = _ridge_accuracy(_part_crops(train_images, train_masks), train_y, _part_crops(test_images, test_masks),
                                test_y, 10)
    assert without_part < 0.2  # chance is 0.1 (300 test images)
    assert part_only > 0.9
    # and the class changes nothing but the part: the same scene drawn with another class's pattern
    data = SyntheticFineGrained(n_classes=10, n_per_class=2, image_size=32, difficulty="medium")
    own, other = data.render(0), data.render(0, label=5)
    assert np.array_equal(own.image[~own.part_mask], other.image[~own.part_mask])
    assert not np.array_equal(own.image[own.part_mask], other.image[own.part_mask])


@pytest.mark.parametrize("code_side", [2, 3, 5])
def test_part_pattern_follows_code_side_and_mask(code_side):
    n_classes = 6 if code_side == 2 else 8
    data = SyntheticFineGrained(n_classes=n_classes, n_per_class=2, image_size=60, part_fraction=0.5,
                                code_side=code_side)
    codes = data._codes.reshape(n_classes, -1)
    assert (codes.sum(axis=1) == code_side**2 // 2).all() and len({c.tobytes() for c in codes}) == n_classes
    for index in (0, 5):
        sample = data.render(index)
        rows, cols = np.nonzero(sample.part_mask)
        part = sample.image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(int)
        assert part.shape[:2] == (data.part_size, data.part_size)
        # light cells are brighter than dark ones, cell by cell, in the class's pattern
        cell = (np.arange(data.part_size) * code_side) // data.part_size
        pattern = data._codes[sample.label][cell[:, None], cell[None, :]]
        assert part.sum(-1)[pattern].min() > part.sum(-1)[~pattern].max()
        # the scene outside the part does not depend on the class (no global cue by default)
        other = data.render(index, label=(sample.label + 1) % n_classes)
        assert np.array_equal(sample.image[~sample.part_mask], other.image[~sample.part_mask])


def test_class_hue_is_a_global_class_cue():
    data = SyntheticFineGrained(n_classes=4, n_per_class=2, image_size=48, class_hue=1.0)
    own = data.render(0)
    other = data.render(0, label=2)
    outside = ~own.part_mask
    assert not np.array_equal(own.image[outside], other.image[outside])  # the object's colour changed
    # with class_hue = 1 every object of a class has the class's hue: same index -> same scene otherwise
    plain = SyntheticFineGrained(n_classes=4, n_per_class=2, image_size=48)
    differs = np.any(plain.render(0).image != own.image, axis=-1)
    assert differs.any() and differs.mean() < 0.5  # only the object's pixels changed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(difficulty="extreme"), "difficulty"),
        (dict(part_fraction=0.0), "part_fraction"),
        (dict(part_fraction=1.5), "part_fraction"),
        (dict(code_side=1), "code_side"),
        (dict(class_hue=-0.1), "class_hue"),
        (dict(image_size=16, part_fraction=0.05), "at least 1 pixel"),
        (dict(n_classes=7, code_side=2), "at most 6"),
    ],
)
def test_difficulty_knobs_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticFineGrained(**kwargs)


def test_clutter_knob_calms_the_background_and_demo_preset_uses_it():
    """clutter=0 (the "demo" preset): no clutter shapes, background near mid-grey; 1: the original scene."""
    def far_from_grey(data):
        images = np.stack([data.render(i).image for i in range(len(data))]).astype(np.float32)
        masks = np.stack([data.render(i).part_mask for i in range(len(data))])
        deviation = np.abs(images - 127.5).max(axis=-1)[~masks]
        return float((deviation > 0.2 * 255).mean())

    calm = SyntheticFineGrained(n_classes=4, n_per_class=5, image_size=32, difficulty="demo")
    busy = SyntheticFineGrained(n_classes=4, n_per_class=5, image_size=32, difficulty="easy")
    assert (calm.clutter, calm.part_fraction, calm.code_side) == (0.0, 0.4, 3)
    assert busy.clutter == 1.0
    assert far_from_grey(calm) < 0.3 < far_from_grey(busy)
    with pytest.raises(ValueError, match="clutter"):
        SyntheticFineGrained(n_classes=2, n_per_class=1, clutter=1.5)
