"""docs/recipes.md's table is generated from the recipes; the stale sentences of issue 22 are gone."""

from __future__ import annotations

from pathlib import Path

from cmd.recipes.__main__ import replace_table

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_table_is_the_generated_one():
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert replace_table(text) == text, "docs/recipes.md is stale: run python -m cmd.recipes --update docs/recipes.md"
    assert "| `lr` | 0.0005 | 0.0005 |" in text


def test_stale_sentences_are_gone():
    recipes = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert "a tiny ViT, 64 px crops" not in recipes and "spelled out above" not in recipes
    assert "--recipe paper" in recipes
    assert "defaults to the warm-up" not in (ROOT / "docs" / "differences.md").read_text(encoding="utf-8")
    assert "tiny ViT" not in (ROOT / "cmd" / "cli" / "pretrain.py").read_text(encoding="utf-8")
    assert "stem 16" not in (ROOT / "cmd" / "cli" / "options.py").read_text(encoding="utf-8")
