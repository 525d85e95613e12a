"""build_dataset: names, miniature on-disk layouts, and errors that say where the files go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from cmd.data import CUB200, ImageListDataset, SyntheticFineGrained, build_dataset
from tests.data.test_cub import make_mini_cub


def _jpeg(path: Path, colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (6, 5), colour).save(path)


def test_synthetic_and_cub_by_name(tmp_path):
    data = build_dataset("synthetic", split="test", n_classes=3, n_per_class=2, image_size=32)
    assert isinstance(data, SyntheticFineGrained) and data.split == "test" and len(data) == 6
    make_mini_cub(tmp_path)
    for name in ("cub200", "CUB", "cub-200-2011"):
        cub = build_dataset(name, tmp_path, "test", transform=lambda im: im.size)
        assert isinstance(cub, CUB200) and len(cub) == 3 and cub[0][0] == (10 + 2, 8)


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for c, name in enumerate(["b_class", "a_class"]):
            for k in range(2):
                _jpeg(tmp_path / split / name / f"{k}.jpg", (c * 100, 0, 0))
    data = build_dataset("imagefolder", tmp_path, "val")
    assert isinstance(data, ImageListDataset)
    assert data.classes == ["a_class", "b_class"] and data.targets == [0, 0, 1, 1]
    image, label = data[3]
    assert image.size == (6, 5) and label == 1
    flat = build_dataset("image_folder", tmp_path / "train", "")
    assert len(flat) == 4
    with pytest.raises(FileNotFoundError, match="test"):
        build_dataset("imagefolder", tmp_path, "test")
    (tmp_path / "train" / "c_empty").mkdir()
    (tmp_path / "val" / "c_empty").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder of .*train holds no image file: .*train/c_empty"):
        build_dataset("imagefolder", tmp_path, "train")
    with pytest.warns(UserWarning, match=r"val has no image for 1 of the 3 classes.*empty folders.*val/c_empty"):
        build_dataset("imagefolder", tmp_path, "val")  # labelled by train's list: like a missing folder


def test_missing_cars_and_aircraft_say_where_to_put_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"stanford_cars.*torchvision cannot download it"):
        build_dataset("stanford_cars", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"fgvc-aircraft-2013b.*robots.ox.ac.uk"):
        build_dataset("aircraft", tmp_path, "test")


def test_fgvc_aircraft_mini_layout(tmp_path):
    data_dir = tmp_path / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A380", "Cessna 172"]
    data_dir.mkdir(parents=True)
    (data_dir / "variants.txt").write_text("\n".join(variants) + "\n")
    rows = {"trainval": [("1000001", "A380"), ("1000002", "Cessna 172"), ("1000003", "707-320")],
            "test": [("1000004", "Cessna 172"), ("1000005", "A380"), ("1000006", "707-320")]}
    for split, entries in rows.items():
        (data_dir / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in entries))
        for image_id, _ in entries:
            _jpeg(data_dir / "images" / f"{image_id}.jpg")
    train = build_dataset("fgvc_aircraft", tmp_path, "train")  # train means trainval
    assert train.classes == variants and train.targets == [1, 2, 0]
    assert build_dataset("fgvc-aircraft", tmp_path, "test").targets == [2, 1, 0]
    assert train[0][0].size == (6, 5)


def test_stanford_cars_mini_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    base = tmp_path / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    scipy_io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    annotations = np.zeros((1, 3), dtype=[("fname", "O"), ("class", "O")])
    for k, (fname, cls) in enumerate([("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 2)]):
        annotations[0, k] = (fname, np.array([[cls]], dtype=np.uint8))
        _jpeg(base / "cars_train" / fname)
    scipy_io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annotations})
    cars = build_dataset("cars", tmp_path, "train")
    assert cars.targets == [1, 0, 1] and cars.num_classes == 2
    assert cars[2][0].size == (6, 5)


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        build_dataset("imagenet", tmp_path)
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("cub200")
    with pytest.raises(TypeError, match="unexpected arguments"):
        build_dataset("imagefolder", tmp_path, "train", n_classes=3)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        build_dataset("cars", tmp_path, "val")
