"""cmd.recipes in Python: names, typed configs, checked overrides; nothing imports torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import cmd.recipes as recipes
from cmd.recipes.schema import Config, OptionError, option_specs


def test_names_and_every_recipe_states_every_option():
    assert {"demo", "paper", "released", "paper-cars", "released-cars"} <= set(recipes.names())
    for name in recipes.names():
        recipe = recipes.load(name)
        assert set(recipe.values) == set(option_specs(Config)), name
        assert recipe.description, name
        assert isinstance(recipes.get(name), Config)


def test_get_returns_a_typed_config_with_checked_overrides():
    cfg = recipes.get("demo")
    assert (cfg.arch, cfg.lr, cfg.out_dim) == ("resnet18", 4e-3, 128)
    assert cfg.backbone_kwargs == {"channels": [16, 32, 64, 128], "output_stride": 8}
    assert cfg.global_crops_scale == (0.4, 1.0)
    assert dataclasses.replace(cfg, lr=1e-3).lr == 1e-3 and recipes.get("demo", epochs=3).epochs == 3
    with pytest.raises(OptionError, match="epochs: must be >= 1"):
        dataclasses.replace(cfg, epochs=0)
    with pytest.raises(OptionError, match="koleo_weight: KoLeo needs at least 2 images"):
        dataclasses.replace(cfg, koleo_weight=0.1, batch_size_per_gpu=1)
    with pytest.raises(OptionError, match="out_dim: must be >= 2"):
        dataclasses.replace(cfg, out_dim=1)
    with pytest.raises(OptionError, match="global_crops_scale: must be increasing"):
        dataclasses.replace(cfg, global_crops_scale=(0.5, 0.4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    # the recipe's own dict is not shared with the config
    cfg.backbone_kwargs["channels"].append(256)
    assert recipes.get("demo").backbone_kwargs["channels"] == [16, 32, 64, 128]


def test_unknown_recipe_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown recipe 'papr' \(did you mean paper\?\)"):
        recipes.get("papr")


def test_an_override_that_is_not_an_option_is_refused_by_name():
    with pytest.raises(OptionError, match=r"^epoch: not an option of a recipe \(did you mean epochs\?\)$"):
        recipes.get("demo", epoch=3)
    with pytest.raises(OptionError, match=r"^zzz: not an option of a recipe$"):
        recipes.get("demo", zzz=1)


def test_import_does_not_import_torch():
    code = "import cmd, cmd.recipes, sys; cmd.recipes.get('paper'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
