"""Digits: scikit-learn's bundled handwritten digits, upsampled, with a seeded stratified split; and its wiring."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

from cmd.data import Digits, build_dataset  # noqa: E402


def test_split_is_stratified_disjoint_complete_and_seeded():
    source = load_digits()
    train, test = Digits("train", seed=0), Digits("test", seed=0)
    assert len(train) + len(test) == 1797 and train.num_classes == 10 and train.classes[3] == "3"
    assert not set(train.indices) & set(test.indices)
    counts = np.bincount(source.target, minlength=10)
    assert np.bincount(test.targets, minlength=10).tolist() == [int(round(0.5 * n)) for n in counts]
    assert train.targets == source.target[train.indices].tolist()
    assert np.array_equal(Digits("test", seed=0).indices, test.indices)  # the same seed, the same split
    assert not np.array_equal(Digits("test", seed=1).indices, test.indices)
    assert len(Digits("test", seed=0, test_fraction=0.2)) == sum(int(round(0.2 * n)) for n in counts)


def test_images_are_the_scans_upsampled_to_rgb():
    source = load_digits()
    data = Digits("train", seed=2)
    image, label = data[5]
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == int(source.target[data.indices[5]])
    pixels = np.asarray(image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    native = np.asarray(Digits("train", seed=2, image_size=8).image(5))[..., 0]
    assert np.array_equal(native, np.round(source.images[data.indices[5]] * 255 / 16).astype(np.uint8))
    # the upsampled image is the scan's: its 4 x 4 block means follow the 8 x 8 scan closely
    blocks = pixels[..., 0].astype(float).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), native.astype(float).ravel())[0, 1] > 0.95
    assert data[0][0].size == (32, 32) and Digits("test", transform=lambda im: im.size)[0][0] == (32, 32)


def test_argument_errors_and_missing_sklearn(monkeypatch):
    for kwargs, match in [(dict(split="val"), "split"), (dict(seed=-1), "seed"), (dict(test_fraction=1.0),
                          "test_fraction"), (dict(image_size=4), "image_size")]:
        with pytest.raises(ValueError, match=match):
            Digits(**kwargs)
    with pytest.raises(IndexError):
        Digits("test")[10_000]
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(ImportError, match=r"pip install 'cmd-fgvc\[viz\]'"):
        Digits("train")


def test_registry_and_training_build_data():
    from cmd.training import build_data

    data = build_dataset("digits", split="test", seed=3)
    assert isinstance(data, Digits) and data.seed == 3
    cfg = SimpleNamespace(dataset="digits", data_path=None, seed=3)
    built = build_data(cfg, "test", transform=lambda im: im.size)
    assert np.array_equal(built.indices, data.indices) and built[0][0] == (32, 32)
    with pytest.raises(TypeError, match="synthetic data only"):
        build_data(cfg, "test", return_part_mask=True)


def test_pretrain_options_take_digits_without_a_data_path(monkeypatch):
    from cmd.cli.common import build_data
    from cmd.cli.options import parse_pretrain_args

    args = parse_pretrain_args(["--dataset", "digits"])
    assert args.recipe == "demo" and args.data_path is None
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match=r"--dataset digits: .*cmd-fgvc\[viz\]"):
        build_data(args, "train", None, command="pretrain")


def test_pretrain_runs_on_digits(tmp_path):
    from cmd.cli import pretrain
    from tests.examples.test_pretrain import SMALL

    result = pretrain.main([*SMALL, "--dataset", "digits", "--epochs", "1", "--max_steps", "2",
                            "--output_dir", str(tmp_path)])
    assert result["interrupted"] and result["step"] == 2
