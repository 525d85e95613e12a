"""Datasets given hostile inputs: splits with different classes, 16-bit PNGs, symlink loops, image bombs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader

from cmd.data import build_dataset, load_rgb
from cmd.eval import KNNClassifier, extract_features
from cmd.transforms import eval_transform

COLOURS = {"a": (250, 10, 10), "b": (10, 250, 10), "c": (10, 10, 250)}


def _folder(root: Path, split: str, classes: str, n: int = 3) -> None:
    for name in classes:
        for k in range(n):
            path = root / split / name / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            colour = tuple(min(255, v + 3 * k) for v in COLOURS[name])
            PIL.Image.new("RGB", (12, 12), colour).save(path)


def test_test_split_labels_come_from_the_train_class_map(tmp_path):
    """Issue 15 item 1: train {a, b, c} / test {a, c}: evaluate-style k-NN is 100 %, not 50 %."""
    _folder(tmp_path, "train", "abc")
    _folder(tmp_path, "test", "ac")
    transform = eval_transform(8, resize=8)
    train = build_dataset("imagefolder", tmp_path, "train", transform)
    with pytest.warns(UserWarning, match=r"no image for 1 of the 3 classes.*no folder for \['b'\]"):
        test = build_dataset("imagefolder", tmp_path, "test", transform)
    assert test.classes == train.classes == ["a", "b", "c"]
    assert sorted(set(test.targets)) == [0, 2]
    model = torch.nn.Flatten()
    train_x, train_y = extract_features(model, DataLoader(train, batch_size=4), progress=False)
    test_x, test_y = extract_features(model, DataLoader(test, batch_size=4), progress=False)
    knn = KNNClassifier(k=(1, 3), backend="torch")
    knn.fit(train_x, train_y)
    result = knn.evaluate(test_x, test_y)
    assert result[1]["top1"] == 100.0 and result[3]["top1"] == 100.0


def test_test_only_classes_are_refused_by_name(tmp_path):
    _folder(tmp_path, "train", "ab", n=1)
    _folder(tmp_path, "test", "ac", n=1)
    with pytest.raises(ValueError, match=r"test has 1 classes that .*train lacks: \['c'\]"):
        build_dataset("imagefolder", tmp_path, "test")
    # an explicit class list wins over the train folder
    data = build_dataset("imagefolder", tmp_path, "test", classes=["c", "a"])
    assert data.classes == ["c", "a"] and sorted(data.targets) == [0, 1]


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    """Issue 15 item 4: a 16-bit grayscale PNG keeps its tones (it used to come out 99.6 % white)."""
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "gray16.png"
    PIL.Image.fromarray(values).save(path)
    with PIL.Image.open(path) as image:
        assert image.mode in ("I;16", "I")
    rgb = np.asarray(load_rgb(path))
    expected = np.round(values.astype(np.float64) * 255 / 65535)
    assert rgb.shape == (64, 64, 3)
    assert np.abs(rgb[..., 0].astype(np.float64) - expected).max() <= 0.5 + 1e-9
    assert (rgb[..., 0] == 255).mean() < 0.01
    # mode "I" (32-bit integers) holding 16-bit values scales the same way
    path_i = tmp_path / "gray_i.tif"
    PIL.Image.fromarray(values.astype(np.int32), mode="I").save(path_i)
    assert np.array_equal(np.asarray(load_rgb(path_i)), rgb)


def test_float_tiff_in_unit_range_is_scaled_not_black(tmp_path):
    """Issue 24 item 8: a float32 TIFF with values in [0, 1] loaded with mean 0.0002 (PIL truncates to 0 / 1)."""
    values = np.linspace(0.0, 1.0, 48 * 48, dtype=np.float32).reshape(48, 48)
    path = tmp_path / "float.tif"
    PIL.Image.fromarray(values, mode="F").save(path)
    with PIL.Image.open(path) as image:
        assert image.mode == "F"
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (48, 48, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(np.float64) - values.astype(np.float64) * 255).max() <= 0.5 + 1e-6
    assert abs(rgb.mean() - 127.5) < 1.0
    # through a dataset, as `evaluate` reads it
    (tmp_path / "train" / "a").mkdir(parents=True)
    PIL.Image.fromarray(values, mode="F").save(tmp_path / "train" / "a" / "0.tif")
    image, _ = build_dataset("imagefolder", tmp_path, "train")[0]
    assert np.asarray(image).mean() > 100


@pytest.mark.parametrize(("fill", "message"), [(2.0, r"values in \[0, 2\]"), (-0.5, r"values in \[-0.5, 1\]"),
                                               (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")])
def test_float_tiff_outside_unit_range_is_refused_naming_the_file(tmp_path, fill, message):
    values = np.linspace(0.0, 1.0, 16 * 16, dtype=np.float32).reshape(16, 16)
    values[3, 4] = fill
    path = tmp_path / "odd.tif"
    PIL.Image.fromarray(values, mode="F").save(path)
    with pytest.raises(ValueError, match=rf"odd\.tif \(PIL mode 'F'.*{message}"):
        load_rgb(path)


def test_directory_symlink_loop_is_refused_with_the_path(tmp_path):
    """Issue 15 item 5: a link back to its parent folder used to list the same files over and over."""
    _folder(tmp_path, "train", "ab", n=2)
    link = tmp_path / "train" / "a" / "again"
    try:
        os.symlink(tmp_path / "train" / "a", link, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("no symlinks here")
    with pytest.raises(ValueError, match=r"symlink loop.*again"):
        build_dataset("imagefolder", tmp_path, "train")
    link.unlink()
    # a link to a folder elsewhere (no loop) is still followed
    _folder(tmp_path, "extra", "b", n=1)
    os.symlink(tmp_path / "extra" / "b", tmp_path / "train" / "a" / "more", target_is_directory=True)
    data = build_dataset("imagefolder", tmp_path, "train")
    assert len(data) == 5 and data.targets == [0, 0, 0, 1, 1]


def test_decompression_bomb_names_the_file(tmp_path, monkeypatch):
    """Issue 15 item 17: PIL's DecompressionBombError now names the file."""
    path = tmp_path / "big.png"
    PIL.Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(PIL.Image.DecompressionBombError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        load_rgb(path)
