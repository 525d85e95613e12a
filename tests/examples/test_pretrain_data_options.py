"""examples/pretrain.py: the synthetic difficulty options and the backbone kwargs (from the recipe only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "pretrain.py"


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_example_options", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_difficulty_reaches_the_dataset(pretrain):
    args = pretrain.parse_args(["--synthetic_difficulty", "easy", "--synthetic_image_size", "64", "--synthetic_classes", "3",
                                "--synthetic_per_class", "2", "--synthetic_class_hue", "0.5"])
    data = pretrain.build_data(args, "train", None)
    assert (data.difficulty, data.code_side, data.class_hue) == ("easy", 3, 0.5)
    assert data.part_size == int(0.4 * 64)
    hard = pretrain.build_data(pretrain.parse_args(["--synthetic_classes", "3", "--synthetic_per_class", "2",
                                                    "--synthetic_difficulty", "hard", "--synthetic_image_size", "64"]),
                               "train", None)
    assert (hard.difficulty, hard.part_size, hard.class_hue) == ("hard", 12, 0.0)


DEMO_RESNET = {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 8}


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], DEMO_RESNET),  # the demo recipe states its narrow ResNet-18
        (["--arch", "resnet18"], DEMO_RESNET),
        (["--arch", "resnet18", "--global_size", "224"], DEMO_RESNET),  # widths never change with the crop size
        (["--arch", "vit_tiny"], {}),  # another backbone: timm's model as it is, not the recipe's kwargs
        (["--arch", "vit_tiny", "--global_size", "32"], {}),
        (["--arch", "swin_tiny"], {}),
        (["--arch", "resnet18", "--backbone_kwargs", '{"output_stride": 32}'], {"output_stride": 32}),
    ],
)
def test_backbone_kwargs_come_from_the_recipe_only(pretrain, argv, expected):
    assert pretrain.parse_args(argv).backbone_kwargs == expected


def test_small_resnet_gives_pooled_vector_and_tokens(pretrain):
    import torch

    import cmd

    args = pretrain.parse_args(["--arch", "resnet18"])
    backbone = cmd.create_backbone("resnet18", **args.backbone_kwargs)
    out = backbone(torch.randn(2, 3, 64, 64))
    assert out.pooled.shape == (2, 128) and out.tokens.shape == (2, 64, 128) and out.grid == (8, 8)
