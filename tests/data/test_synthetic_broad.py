"""`cmd.data.SyntheticBroad`: the broad data of the two-stage protocol's first stage."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cmd.data import SyntheticBroad, SyntheticFineGrained
from cmd.data.synthetic import _class_codes
from cmd.data.synthetic_broad import SCENE_KINDS, SEED_OFFSET
from cmd.training import build_data


def test_classes_labels_and_order():
    data = SyntheticBroad(n_classes=8, n_per_class=3, image_size=32, seed=1)
    assert len(data) == 24 and data.num_classes == 8 and len(data.classes) == 8
    assert data.classes[:3] == ["demo/class_0", "demo/class_1", "easy/class_0"]
    assert data.targets == [c for c in range(8) for _ in range(3)]  # by kind, then by class
    assert [data[i][1] for i in range(len(data))] == data.targets
    assert data[-1][1] == 7 and data[np.int64(4)][1] == 1 and data[torch.tensor(23)][1] == 7


def test_each_kind_is_its_difficulty_with_4x4_patterns_of_its_own_seed():
    data = SyntheticBroad(n_classes=8, n_per_class=2, image_size=32, seed=3)
    for k, kind in enumerate(SCENE_KINDS):
        reference = SyntheticFineGrained(n_classes=2, n_per_class=2, image_size=32, seed=3 + SEED_OFFSET + k,
                                         difficulty=kind, code_side=4)
        for i in range(4):
            image, label = data[4 * k + i]
            ref_image, ref_label = reference[i]
            assert np.array_equal(np.asarray(image), np.asarray(ref_image)) and label == 2 * k + ref_label
    assert data.scenes[3].part_fraction == 0.2 and data.scenes[0].clutter == 0.0 and data.scenes[2].clutter == 1.0


def test_patterns_are_not_those_of_the_fine_grained_seeds():
    broad = SyntheticBroad(n_classes=64, n_per_class=1, image_size=32, seed=0)
    codes = {c.tobytes() for scene in broad.scenes for c in scene._codes}
    assert len(codes) == 64  # 64 distinct 4 x 4 patterns
    # a `hard` (4 x 4) fine-grained set meets them by chance only: 64 of 12870 patterns, so ~0.05 of its 10
    shared = [len(codes & {c.tobytes() for c in _class_codes(10, seed, 4)}) for seed in range(20)]
    assert sum(shared) <= 3 and max(shared) <= 1, shared


def test_deterministic_splits_masks_and_transforms():
    a = SyntheticBroad(n_classes=4, n_per_class=2, image_size=32, return_part_mask=True)
    b = SyntheticBroad(n_classes=4, n_per_class=2, image_size=32, return_part_mask=True, cache=False)
    test = SyntheticBroad(n_classes=4, n_per_class=2, image_size=32, split="test")
    image, label, mask = a[5]
    assert np.array_equal(np.asarray(image), np.asarray(b[5][0])) and mask.dtype == torch.bool and mask.any()
    assert not np.array_equal(np.asarray(image), np.asarray(test[5][0]))
    shifted = SyntheticBroad(n_classes=4, n_per_class=2, image_size=32, transform=lambda im: im.size,
                             target_transform=lambda y: y + 100)
    assert shifted[5] == ((32, 32), label + 100)


@pytest.mark.parametrize("n_classes", [0, 2, 10, True, 4.0])
def test_bad_class_counts(n_classes):
    with pytest.raises(ValueError, match="multiple of 4"):
        SyntheticBroad(n_classes=n_classes)


def test_bad_indices():
    data = SyntheticBroad(n_classes=4, n_per_class=1, image_size=32)
    with pytest.raises(IndexError):
        data[4]
    with pytest.raises(IndexError):
        data[-5]
    with pytest.raises(TypeError):
        data[1.0]
    with pytest.raises(TypeError):
        data[True]


def test_the_program_builds_it_for_difficulty_broad():
    cfg = SimpleNamespace(dataset="synthetic", synthetic_difficulty="broad", synthetic_classes=8,
                          synthetic_per_class=2, synthetic_image_size=32, seed=0, synthetic_class_hue=None,
                          synthetic_clutter=None)
    data = build_data(cfg, "train", return_part_mask=True)
    assert isinstance(data, SyntheticBroad) and len(data) == 16 and len(data[0]) == 3
    with pytest.raises(ValueError, match="synthetic_clutter"):
        build_data(SimpleNamespace(**{**vars(cfg), "synthetic_clutter": 0.5}), "train")
