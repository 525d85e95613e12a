"""The typed schema of the training options: one `Config` field per option of a recipe.

A field's metadata (`OptionSpec`) holds what the command line and the config files need: the
checker of the value (which also parses the command line's text), the help text, the group of
``--help``, the choices. `Config.__post_init__` runs every checker and the cross-option checks, so a
`Config` built from a recipe, from ``dataclasses.replace`` or by ``cmd-fgvc pretrain`` is range-checked
the same way. Nothing here imports torch.

Example:
    >>> import dataclasses
    >>> from cmd.recipes import get
    >>> cfg = dataclasses.replace(get("demo"), lr=1e-3)
    >>> cfg.lr, cfg.out_dim
    (0.001, 128)
    >>> dataclasses.replace(cfg, epochs=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    cmd.recipes.schema.OptionError: epochs: must be >= 1, got 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Config", "OptionError", "OptionSpec", "option", "option_specs"]

Check = Callable[[Any], Any]


class OptionError(ValueError):
    """A value refused by the schema; ``option`` names the option (without ``--``)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


# ------------------------------------------------------------------------------------------ checkers
# A checker takes the command line's text or a typed value (YAML, Python) and returns the normalised
# value, or raises argparse.ArgumentTypeError (which argparse reports as "argument --x: message").


def _fail(message: str) -> None:
    raise argparse.ArgumentTypeError(message)


def int_range(low: int | None = None, high: int | None = None) -> Check:
    """An integer in ``[low, high]`` (None: unbounded); ``"3"`` and ``3`` alike, never ``1.5`` or ``True``."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            _fail(f"expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            _fail(f"expected an integer, got {value!r}")
        if low is not None and number < low:
            _fail(f"must be >= {low}, got {number}")
        if high is not None and number > high:
            _fail(f"must be <= {high}, got {number}")
        return number

    check.__name__ = "integer"
    return check


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Check:
    """A finite number in ``low .. high`` (open ends on request)."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            _fail(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            _fail(f"expected a number, got {value!r}")
        if not math.isfinite(number):
            _fail(f"must be finite, got {value!r}")
        if low is not None and (number < low or (low_open and number == low)):
            _fail(f"must be {'>' if low_open else '>='} {low:g}, got {number:g}")
        if high is not None and (number > high or (high_open and number == high)):
            _fail(f"must be {'<' if high_open else '<='} {high:g}, got {number:g}")
        return number

    check.__name__ = "number"
    return check


def boolean(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0 (text), or a bool."""
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    _fail(f"expected true or false, got {value!r}")


def switch(value: Any) -> bool:
    """A command-line switch (``--no_knn``): in a file or in Python, exactly true or false."""
    if not isinstance(value, bool):
        _fail(f"expected true or false, got {value!r}")
    return value


def json_object(value: Any) -> dict:
    """A mapping: a dict, or JSON text such as ``'{"depth": 4}'``; returned as a deep copy."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            _fail(f"not valid JSON ({err.msg} at column {err.colno}): {value!r}")
    if not isinstance(value, dict):
        _fail(f"expected a JSON object such as '{{\"depth\": 4}}', got {value!r}")
    return json.loads(json.dumps(value))


def text(value: Any) -> str:
    """A string."""
    if not isinstance(value, str):
        _fail(f"expected a string, got {value!r}")
    return value


def path(value: Any) -> str:
    """A file or folder name; ``~`` and ``~user`` are expanded as a shell would."""
    return os.path.expanduser(text(value))


def device_name(value: Any) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not isinstance(value, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        _fail(f"expected cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def one_of(*choices: str) -> Check:
    """One of ``choices`` (argparse also lists them in ``--help``)."""

    def check(value: Any) -> str:
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in choices:
            _fail(f"invalid choice: {value!r} (choose from {', '.join(repr(c) for c in choices)})")
        return value

    check.__name__ = "choice"
    return check


def optional(check: Check) -> Check:
    """``check``, or None (``null`` in a file: the option's documented fallback)."""

    def optional_check(value: Any) -> Any:
        return None if value is None else check(value)

    optional_check.__name__ = check.__name__
    return optional_check


def values(check: Check, count: int | None = None) -> Check:
    """A list of values (``count`` of them, or at least one), each checked by ``check``."""

    def check_list(value: Any) -> Any:
        items = list(value) if isinstance(value, list | tuple) else [value]
        if count is not None and len(items) != count:
            _fail(f"expected {count} values, got {value!r}")
        if not items:
            _fail("expected at least one value")
        checked = [check(v) for v in items]
        return tuple(checked) if count is not None else checked

    check_list.__name__ = check.__name__
    return check_list


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
POSITIVE_FLOAT = float_range(0.0, low_open=True)
NON_NEGATIVE_FLOAT = float_range(0.0)
FRACTION = float_range(0.0, 1.0)
CROP_SCALE = values(float_range(0.0, 1.0, low_open=True), 2)
COLOR_JITTER = values(NON_NEGATIVE_FLOAT, 4)
BLUR_SIGMA = values(POSITIVE_FLOAT, 2)


# --------------------------------------------------------------------------------------------- fields


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How an option is checked and shown: see `option`."""

    group: str
    help: str
    check: Check
    choices: tuple[str, ...] | None = None
    nargs: int | str | None = None
    metavar: str | tuple[str, ...] | None = None
    switch: bool = False  # a store_true flag on the command line
    in_recipe: bool = False  # the value comes from the recipe (no schema default)


def option(group: str, help: str, check: Check, *, default: Any = dataclasses.MISSING,
           choices: Sequence[str] | None = None, nargs: int | str | None = None,
           metavar: str | tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its `OptionSpec`; without ``default`` the value must come from a recipe."""
    is_switch = check is switch
    if choices is not None:
        check = one_of(*choices)
    spec = OptionSpec(group, help, check, tuple(choices) if choices else None, nargs, metavar, is_switch,
                      in_recipe=default is dataclasses.MISSING)
    return dataclasses.field(default=default, metadata={"option": spec})


def option_specs(cls: type) -> dict[str, OptionSpec]:
    """Option name -> `OptionSpec`, in the order of the schema's fields."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


MIL_POOLINGS = ("mean", "sum", "max", "attention", "gated_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The options of a training recipe: the method, the optimisation and the crops (no plumbing).

    Attribute names are the ``cmd-fgvc pretrain`` option names. Every field is checked when the object
    is built (also by ``dataclasses.replace``); a bad value raises `OptionError`, naming the option.
    Get one with ``cmd.recipes.get(name)``.
    """

    # ---- model
    arch: str = option("model", "backbone (timm name or alias: resnet18, swin_tiny, vit_small, ...)", text)
    backbone_kwargs: dict = option(
        "model", 'JSON dict of timm kwargs of the backbone, e.g. \'{"window_size": 14}\'', json_object,
        metavar="JSON")
    drop_path: float = option("model", "stochastic depth of the student backbone (timm drop_path_rate; the "
                              "teacher has none)", float_range(0.0, 1.0, high_open=True))
    out_dim: int = option("model", "K, prototypes of the heads", int_range(2))
    head_hidden_dim: int = option("model", "hidden width of the heads' MLP", POSITIVE)
    head_bottleneck_dim: int = option("model", "bottleneck of the heads", POSITIVE)
    norm_last_layer: bool = option("model", "weight-normalise the prototype layer with a fixed norm", boolean,
                                   metavar="BOOL")
    mil_pooling: str = option("model", "multi-instance pooling of the region tokens into a bag embedding",
                              text, choices=MIL_POOLINGS)
    image_input: str = option("model", "input of the image head: the backbone's pooled feature or the MIL bag "
                              "embedding", text, choices=("pooled", "mil"))
    head_bn: bool = option("model", "BatchNorm after the hidden layers of the heads' MLP (DINO's use_bn; "
                           "SyncBatchNorm under torch.distributed on GPUs)", boolean, metavar="BOOL")
    share_prototypes: bool = option("model", "one prototype layer for the image and region heads", boolean,
                                    metavar="BOOL")
    # ---- loss
    loss: str = option("loss", "preset of loss terms: dino (image), esvit (image + region), cmd (all four)", text,
                       choices=("dino", "esvit", "cmd"))
    image_weight: float | None = option("loss", "weight of the image-level term; null: the --loss preset's",
                                        optional(NON_NEGATIVE_FLOAT))
    region_weight: float | None = option("loss", "weight of the region-level term; null: the --loss preset's",
                                         optional(NON_NEGATIVE_FLOAT))
    inter_weight: float | None = option("loss", "weight of the inter-level (MIL bag) term; null: the --loss "
                                        "preset's", optional(NON_NEGATIVE_FLOAT))
    swapped_weight: float | None = option("loss", "weight of the swapped-level term (teacher image -> student bag, "
                                          "teacher bag -> student image; an extension, off in every preset); null: "
                                          "the --loss preset's", optional(NON_NEGATIVE_FLOAT))
    teacher_temp: float = option("loss", "teacher temperature after the warm-up", POSITIVE_FLOAT)
    warmup_teacher_temp: float = option("loss", "teacher temperature at the start of the warm-up", POSITIVE_FLOAT)
    warmup_teacher_temp_epochs: int = option("loss", "epochs of linear teacher-temperature warm-up", NON_NEGATIVE)
    student_temp: float = option("loss", "student temperature", POSITIVE_FLOAT)
    center_momentum: float = option("loss", "EMA momentum of the teacher centers, in [0, 1]", FRACTION)
    centering: str = option("loss", "teacher normalisation: DINO's centering, or DINOv2's Sinkhorn-Knopp over the "
                            "batch (ignores --center_momentum)", text, choices=("center", "sinkhorn"))
    koleo_weight: float = option("loss", "weight of DINOv2's KoLeo term on the student's pooled global-crop "
                                 "vectors (needs >= 2 images per process); 0 = off", NON_NEGATIVE_FLOAT)
    # ---- optimisation
    epochs: int = option("optimisation", "training epochs", POSITIVE)
    batch_size_per_gpu: int = option("optimisation", "images per process and step", POSITIVE)
    lr: float = option("optimisation", "peak lr at a total batch of 256 (scaled linearly with the total batch)",
                       POSITIVE_FLOAT)
    min_lr: float = option("optimisation", "lr at the end of the cosine schedule", NON_NEGATIVE_FLOAT)
    warmup_epochs: int = option("optimisation", "epochs of linear lr warm-up", NON_NEGATIVE)
    weight_decay: float = option("optimisation", "weight decay at the start", NON_NEGATIVE_FLOAT)
    weight_decay_end: float = option("optimisation", "weight decay at the end of the cosine schedule",
                                     NON_NEGATIVE_FLOAT)
    momentum_teacher: float = option("optimisation", "EMA momentum of the teacher at the start (cosine to 1), "
                                     "in [0, 1]", FRACTION)
    clip_grad: float = option("optimisation", "per-parameter clipping norm; 0 disables", NON_NEGATIVE_FLOAT)
    freeze_last_layer: int = option("optimisation", "epochs during which the prototype layers get no gradient",
                                    NON_NEGATIVE)
    amp: str = option("optimisation", "mixed precision (auto: bf16 where supported)", text,
                      choices=("bf16", "fp16", "off", "auto"))
    # ---- crops
    global_size: int = option("data", "global crop size", POSITIVE)
    local_size: int = option("data", "local crop size", POSITIVE)
    local_crops_number: int = option("data", "local crops per image", NON_NEGATIVE)
    global_crops_scale: tuple[float, float] = option(
        "data", "area range of the global crops, 0 < MIN <= MAX <= 1", CROP_SCALE, nargs=2, metavar=("MIN", "MAX"))
    local_crops_scale: tuple[float, float] = option(
        "data", "area range of the local crops, 0 < MIN <= MAX <= 1", CROP_SCALE, nargs=2, metavar=("MIN", "MAX"))
    color_jitter: tuple[float, float, float, float] = option(
        "data", "colour jitter of every crop (applied with p 0.8), torchvision's ColorJitter: brightness, "
        "contrast, saturation >= 0 and hue in [0, 0.5] (0.5: a hue shift from the whole colour circle); "
        "DINO: 0.4 0.4 0.2 0.1", COLOR_JITTER, nargs=4, metavar=("BRIGHTNESS", "CONTRAST", "SATURATION", "HUE"))
    blur_sigma: tuple[float, float] = option(
        "data", "std range, in pixels of the crop, of the Gaussian blur (p 1 on the first global crop, 0.1 on "
        "the second, 0.5 on local crops), 0 < MIN <= MAX; DINO: 0.1 2.0 for 224 / 96 px crops", BLUR_SIGMA,
        nargs=2, metavar=("MIN", "MAX"))
    solarization_prob: float = option("data", "probability of solarising the second global crop, in [0, 1]; "
                                      "DINO: 0.2", FRACTION)
    saveckp_freq: int = option("run", "also keep checkpoint{epoch:04}.pth every N epochs; 0: off", NON_NEGATIVE)

    def __post_init__(self) -> None:
        for name, spec in option_specs(type(self)).items():
            try:
                object.__setattr__(self, name, spec.check(getattr(self, name)))
            except argparse.ArgumentTypeError as err:
                raise OptionError(name, str(err)) from None
        self.check()

    def check(self) -> None:
        """The checks across options (each raises `OptionError` naming the option to change)."""
        for name in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, name)
            if low > high:
                raise OptionError(name, f"must be increasing (MIN <= MAX), got {low:g} {high:g}")
        if self.blur_sigma[0] > self.blur_sigma[1]:
            raise OptionError("blur_sigma", f"must be increasing (MIN <= MAX), got {self.blur_sigma[0]:g} "
                              f"{self.blur_sigma[1]:g}")
        if (getattr(self, "dataset", None) == "synthetic" and getattr(self, "synthetic_difficulty", None) == "broad"
                and getattr(self, "synthetic_classes", 4) % 4):
            raise OptionError("synthetic_classes", "the broad synthetic data shares its classes among 4 kinds of "
                              f"scene: a multiple of 4, got {self.synthetic_classes}")
        if self.color_jitter[3] > 0.5:
            raise OptionError("color_jitter", f"the hue jitter must be <= 0.5 (a half turn of the colour circle), "
                              f"got {self.color_jitter[3]:g}")
        if self.koleo_weight > 0 and self.batch_size_per_gpu < 2:
            raise OptionError("koleo_weight", "KoLeo needs at least 2 images per process (the nearest neighbour "
                              f"within the batch), got --batch_size_per_gpu {self.batch_size_per_gpu}")
        if "drop_path_rate" in self.backbone_kwargs:
            raise OptionError("backbone_kwargs", "holds drop_path_rate: set the student's stochastic depth with "
                              "--drop_path instead")

    def to_dict(self) -> dict[str, Any]:
        """The options as plain YAML/JSON values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
