"""CUB200 on a generated miniature CUB_200_2011 tree."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import pytest

from cmd.data import CUB200

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_mini_cub(root: Path, *, classes_txt: bool = True) -> Path:
    """3 classes x (2 train + 1 test) tiny JPEGs in the official layout; returns the CUB_200_2011 dir."""
    base = root / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for c, name in enumerate(CLASSES, start=1):
        (base / "images" / name).mkdir(parents=True)
        for k in range(3):
            image_id += 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}.jpg"
            mode = "L" if k == 2 else "RGB"  # CUB has a few grayscale images
            PIL.Image.new(mode, (10 + k, 8), color=40 * c if mode == "L" else (40 * c, 10, 10)).save(base / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {0 if k == 2 else 1}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    if classes_txt:
        (base / "classes.txt").write_text("\n".join(f"{i} {n}" for i, n in enumerate(CLASSES, start=1)) + "\n")
    return base


def test_reads_the_official_layout(tmp_path):
    base = make_mini_cub(tmp_path)
    train, test = CUB200(tmp_path, "train"), CUB200(base, split="test")  # parent or the folder itself
    assert len(train) == 6 and len(test) == 3
    assert train.targets == [0, 0, 1, 1, 2, 2] and test.targets == [0, 1, 2]
    assert train.classes == CLASSES and train.num_classes == 3
    image, label = test[1]
    assert isinstance(image, PIL.Image.Image) and image.mode == "RGB"  # grayscale converted
    assert image.size == (12, 8) and label == 1
    sized = CUB200(tmp_path, "train", transform=lambda im: im.size, target_transform=lambda y: -y)
    assert sized[3] == ((11, 8), -1)


def test_class_names_from_folders_without_classes_txt(tmp_path):
    make_mini_cub(tmp_path, classes_txt=False)
    assert CUB200(tmp_path).classes == CLASSES


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CUB_200_2011/images.txt"):
        CUB200(tmp_path)
    base = make_mini_cub(tmp_path)
    (base / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        CUB200(tmp_path)


def test_missing_image_is_named(tmp_path):
    base = make_mini_cub(tmp_path)
    victim = base / "images" / CLASSES[1] / "Laysan_Albatross_0001.jpg"
    victim.unlink()
    with pytest.raises(FileNotFoundError, match="Laysan_Albatross_0001.jpg"):
        CUB200(tmp_path, "train")
    CUB200(tmp_path, "test")  # the other split does not need it


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_is_named(tmp_path, damage):
    base = make_mini_cub(tmp_path)
    victim = base / "images" / CLASSES[0] / "Black_footed_Albatross_0000.jpg"
    PIL.Image.new("RGB", (64, 64), (200, 30, 30)).save(victim)
    data = victim.read_bytes()
    victim.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    dataset = CUB200(tmp_path, "train")
    with pytest.raises(OSError, match="Black_footed_Albatross_0000.jpg"):
        dataset[0]
    dataset[1]  # the others still load


def test_malformed_tables_are_named(tmp_path):
    base = make_mini_cub(tmp_path)
    text = (base / "image_class_labels.txt").read_text().splitlines()
    (base / "image_class_labels.txt").write_text("\n".join(text[:-1]) + "\n")  # image 9 has no label
    with pytest.raises(ValueError, match=r"image_class_labels.txt: no entry for image ids \[9\]"):
        CUB200(tmp_path)
    (base / "image_class_labels.txt").write_text("\n".join([*text[:3], "4", *text[4:]]) + "\n")
    with pytest.raises(ValueError, match="image_class_labels.txt, line 4"):
        CUB200(tmp_path)


def test_empty_class_is_reported(tmp_path):
    base = make_mini_cub(tmp_path)
    lines = (base / "train_test_split.txt").read_text().splitlines()
    lines[2] = "3 1"  # class 1's only test image becomes a training image
    (base / "train_test_split.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="001.Black_footed_Albatross"):
        CUB200(tmp_path, "test")


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        CUB200("/nonexistent", split="val")
