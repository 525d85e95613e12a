"""Dataset messages of the commands say what is wrong, naming the folder (issue 24 item 15).

The logic lives in `cmd.data` (`build_dataset("imagefolder", ...)`); the commands only prefix
``--data_path D (split split):``. A class without images in an evaluation split (its folder empty,
or missing altogether) is one case: accepted with a warning naming the folders. An empty class
folder in the split that defines the classes (train) is refused, naming the folder.
"""

from __future__ import annotations

import pytest
from PIL import Image

from cmd.cli import evaluate, pretrain


def _layout(root, splits: dict[str, str], empty: dict[str, str] | None = None):
    for split, classes in splits.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (i * 40, 80, 120)).save(root / split / c / f"{i}.png")
    for split, classes in (empty or {}).items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
    return root


def _evaluate_args(root):
    return evaluate.parse_args(["knn", "--dataset", "imagefolder", "--data_path", str(root)])


def test_an_empty_train_class_folder_is_named_not_called_a_missing_split(tmp_path):
    root = _layout(tmp_path / "d", {"train": "ac", "test": "abc"}, empty={"train": "b"})
    args = pretrain.parse_args(["--dataset", "imagefolder", "--data_path", str(root), "--no_knn"])
    with pytest.raises(SystemExit) as stop:
        pretrain.build_data(args, "train", None)
    message = str(stop.value.code)
    assert "no train split" not in message
    assert f"(train split): 1 class folder of {root / 'train'} holds no image file: {root / 'train' / 'b'}" in message
    assert "add images or remove the folder" in message and "\n" not in message


def test_an_empty_or_missing_test_class_folder_is_the_same_case_a_warning(tmp_path):
    root = _layout(tmp_path / "d", {"train": "abc", "test": "ac"}, empty={"test": "b"})
    with pytest.warns(UserWarning, match=r"test has no image for 1 of the 3 classes .*empty folders .*test/b'\]"):
        data = evaluate._dataset(_evaluate_args(root), "test", None)  # was: "has no test split ... lay out"
    assert data.classes == ["a", "b", "c"] and sorted(set(data.targets)) == [0, 2]
    (root / "test" / "b").rmdir()
    with pytest.warns(UserWarning, match=r"test has no image for 1 of the 3 classes .*no folder for \['b'\]"):
        missing = evaluate._dataset(_evaluate_args(root), "test", None)
    assert missing.classes == data.classes and missing.targets == data.targets


def test_a_test_split_without_any_image_says_so(tmp_path):
    root = _layout(tmp_path / "d", {"train": "ab"}, empty={"test": "ab"})
    with pytest.raises(SystemExit) as stop:
        evaluate._dataset(_evaluate_args(root), "test", None)
    message = str(stop.value.code)
    assert "has no test split" not in message and "lay out" not in message
    assert f"(test split): {root / 'test'} holds no image of the 2 classes" in message
    assert "its class folders ['a', 'b'] are empty" in message
