"""Training recipes as data: every option of a method / optimisation / crop setting, in one YAML file.

A recipe (``cmd/recipes/NAME.yaml``) states every option of `Config` explicitly, or extends exactly
one other recipe and states what differs. ``cmd-fgvc pretrain --recipe NAME`` trains with it (the
default: ``demo`` for ``--dataset synthetic``, ``paper`` for a real dataset, ``paper-cars`` for
``--dataset cars``); in Python, `get` returns the same values as a typed, checked `Config`.

Example:
    >>> import dataclasses
    >>> import cmd.recipes
    >>> cmd.recipes.names()
    ['demo', 'paper', 'paper-cars', 'released', 'released-cars']
    >>> cfg = cmd.recipes.get("paper")
    >>> cfg.lr, cfg.out_dim, cfg.teacher_temp, cfg.drop_path
    (0.0005, 65536, 0.07, 0.1)
    >>> dataclasses.replace(cfg, epochs=100).epochs
    100
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cache
from importlib import resources
from typing import Any

from cmd.recipes.schema import Config, OptionError, option_specs

__all__ = ["Config", "OptionError", "Recipe", "default_for_dataset", "get", "load", "markdown_table", "names"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe file, resolved: ``values`` holds every option (its own and those it inherits)."""

    name: str
    description: str
    extends: str | None
    values: dict[str, Any]
    own: frozenset[str]  # the options the file itself states
    requires_init: str | None = None  # what --init must be (the released runs start from a checkpoint)
    why: dict[str, str] = dataclasses.field(default_factory=dict)  # option -> why it differs from official
    source: dict[str, str] = dataclasses.field(default_factory=dict)  # option -> official value, file:line

    def config(self, **overrides: Any) -> Config:
        """The recipe's values as a `Config` (``overrides`` win), every value checked.

        Raises:
            OptionError: an override that is not an option (with the closest one), or a bad value.
        """
        known = {f.name for f in dataclasses.fields(Config)}
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                raise OptionError(key, "not an option of a recipe" + (f" (did you mean {close[0]}?)" if close else ""))
        return Config(**{**self.values, **overrides})


_KEYS = {"description", "extends", "requires_init", "why", "source", "options"}


@cache
def names() -> list[str]:
    """The names of the recipes shipped in the package, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


@cache
def load(name: str) -> Recipe:
    """The recipe ``name``, resolved through ``extends``.

    Raises:
        ValueError: an unknown name (with the closest one), or a recipe file that is not complete
            (an unknown option, a missing option, a cycle): the message names the file.
    """
    import yaml

    if name not in names():
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown recipe {name!r}{hint}; choose one of {', '.join(names())}")
    where = f"cmd/recipes/{name}.yaml"
    data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict) or set(data) - _KEYS or not isinstance(data.get("options"), dict):
        raise ValueError(f"{where}: expected a mapping with 'description', 'options' and optionally "
                         f"{', '.join(sorted(_KEYS - {'description', 'options'}))}")
    own = data["options"]
    specs = option_specs(Config)
    unknown = sorted(set(own) - set(specs))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)}")
    parent = data.get("extends")
    if parent is not None:
        if not isinstance(parent, str) or parent == name:
            raise ValueError(f"{where}: 'extends' names exactly one other recipe, got {parent!r}")
        base = load(parent)  # a cycle ends in RecursionError: refused below
        values = {**base.values, **own}
        why, source = {**base.why, **data.get("why", {})}, {**base.source, **data.get("source", {})}
        requires_init = data.get("requires_init", base.requires_init)
    else:
        values, why, source, requires_init = dict(own), dict(data.get("why", {})), dict(data.get("source", {})), \
            data.get("requires_init")
    missing = [k for k in specs if k not in values]
    if missing:
        raise ValueError(f"{where}: a recipe states every option; missing {', '.join(missing)}")
    try:
        values = Config(**values).to_dict()
    except OptionError as err:
        raise ValueError(f"{where}: {err}") from None
    return Recipe(name, str(data.get("description", "")), parent, values, frozenset(own), requires_init, why,
                  source)


def get(name: str, **overrides: Any) -> Config:
    """The options of recipe ``name`` as a typed `Config` (``overrides`` replace values, checked).

    Example:
        >>> cfg = get("demo", epochs=3)
        >>> cfg.arch, cfg.backbone_kwargs["channels"], cfg.epochs
        ('resnet18', [16, 32, 64, 128], 3)
    """
    return load(name).config(**overrides)


def default_for_dataset(dataset: str) -> str:
    """The recipe a run uses without ``--recipe``: ``demo`` on synthetic data and digits, ``paper`` (Cars: ``paper-cars``)."""
    if dataset in ("synthetic", "digits"):  # CPU-scale data: the CPU demo's recipe
        return "demo"
    return "paper-cars" if dataset == "cars" else "paper"


def _shown(value: Any) -> str:
    if value is None:
        return "preset's"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "{}"
    if isinstance(value, list | tuple):
        sep = "-" if len(value) == 2 else ", "  # a range MIN-MAX, else a list
        return sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(recipes: list[str] | None = None) -> str:
    """The Markdown table recipe x option of docs/recipes.md (generated: it cannot go stale).

    Columns: the option, each recipe's value, the official value with its source (file:line of the
    official code), and why the demo differs from the paper's value.
    """
    recipes = recipes or ["paper", "released", "paper-cars", "released-cars", "demo"]
    loaded = [load(n) for n in recipes]
    paper = load("paper")
    demo = load("demo")
    head = ["option", *(f"`{r.name}`" for r in loaded), "official (source)", "why the demo differs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in option_specs(Config):
        cells = [f"`{key}`"]
        cells += [_shown(r.values[key]) for r in loaded]
        cells.append(paper.source.get(key, "").replace("|", "\\|"))
        cells.append(demo.why.get(key, "") if demo.values[key] != paper.values[key] else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
