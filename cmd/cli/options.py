"""Options of the ``cmd-fgvc`` commands and the ``--config FILE`` mechanism they share.

Every option is range-checked when it is parsed, and a configuration file goes through the very
same parser: its mapping is turned into command-line tokens placed *before* the real command line,
so a file value is type-, choice- and range-checked exactly like a flag, and a flag given on the
command line wins over the file. A file that is not a mapping, an unknown key, or ``null`` where the
option has a default is refused with the file's name.

Example:
    >>> from cmd.cli.options import parse_pretrain_args
    >>> parse_pretrain_args(["--epochs", "3"]).epochs
    3
    >>> parse_pretrain_args(["--log_every", "0"])  # doctest: +SKIP
    cmd-fgvc pretrain: error: argument --log_every: must be >= 1, got 0
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmd.cli.exit_status import EXIT_STATUS_EPILOG
from cmd.cli.loggers import parse_logger_names

__all__ = [
    "CommandParser",
    "build_evaluate_parser",
    "build_pretrain_parser",
    "config_tokens",
    "parse_evaluate_args",
    "parse_pretrain_args",
]

DATASETS = ["synthetic", "cub", "cars", "aircraft", "imagefolder"]
SYNTHETIC_DIFFICULTIES = ["hard", "easy", "demo"]  # cmd.data.synthetic.DIFFICULTIES (not imported: --help stays torch-free)
# timm kwargs of the small backbones at crops <= 96 px (the CPU demo); --backbone_kwargs overrides them
SMALL_CROP_BACKBONE_KWARGS: dict[str, dict] = {
    "vit_tiny": {"depth": 4, "patch_size": 8, "embed_dim": 96, "num_heads": 3},
    "resnet18": {"channels": [16, 32, 64, 128], "stem_width": 16, "output_stride": 8},
}


# ----------------------------------------------------------------------------------- value types


def int_range(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (None: unbounded)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval ``low .. high`` (open ends on request)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def boolean(text: str) -> bool:
    """An argparse type: true/false, yes/no, on/off, 1/0."""
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def json_object(text: str) -> dict:
    """An argparse type: a JSON object, e.g. ``'{"depth": 4}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at column {err.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 4}}', got {text!r}")
    return value


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


POSITIVE = int_range(1)
NON_NEGATIVE = int_range(0)
POSITIVE_FLOAT = float_range(0.0, low_open=True)
NON_NEGATIVE_FLOAT = float_range(0.0)
FRACTION = float_range(0.0, 1.0)  # momenta
CROP_SCALE = float_range(0.0, 1.0, low_open=True)


def logger_list(text: str) -> str:
    """``--logger``: a comma-separated list of `cmd.cli.loggers.LOGGER_CHOICES` (kept as given)."""
    try:
        parse_logger_names(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# ---------------------------------------------------------------------------------------- parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` once, unless the help already speaks of the default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction | argparse._HelpAction)
        ):
            return text
        if isinstance(default, list | tuple):
            shown = " ".join(str(v) for v in default)
        elif isinstance(default, dict):
            shown = json.dumps(default)
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors say when a bad value came from ``--config FILE``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.config_origin: dict[str, str] = {}  # option string -> config file that set it

    def error(self, message: str) -> None:  # type: ignore[override]
        match = re.match(r"argument (--\w+)", message)
        if match and match.group(1) in self.config_origin:
            message += f" (set in {self.config_origin[match.group(1)]})"
        # one line, not the whole usage: the options are listed by --help
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", type=str, default=None, metavar="FILE",
        help="YAML or JSON mapping of option names to values (e.g. 'epochs: 100'); "
        "options given on the command line override it",
    )


def _add_data(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="synthetic fine-grained data (no files needed), a named benchmark, or an ImageFolder "
                        "tree DATA/train/<class>/<image> and DATA/test/<class>/<image>")
    g.add_argument("--data_path", type=str, default=None, metavar="DIR",
                   help="dataset root (required for every --dataset but synthetic)")
    g.add_argument("--synthetic_classes", type=int_range(2), default=10, help="classes of the synthetic data")
    g.add_argument("--synthetic_per_class", type=POSITIVE, default=100,
                   help="synthetic images per class and split")
    g.add_argument("--synthetic_image_size", type=int_range(16), default=32, help="side of the synthetic images")
    g.add_argument("--synthetic_difficulty", default="demo", choices=SYNTHETIC_DIFFICULTIES,
                   help="preset of the synthetic data (cmd.SyntheticFineGrained): hard = a 4 x 4-cell part on 20 %% "
                        "of the side (the method benchmark); easy = a 3 x 3-cell part on 40 %% of the side; demo = easy "
                        "without clutter, on a calm background (what self-supervision learns visibly on a CPU)")
    g.add_argument("--synthetic_class_hue", type=float_range(0.0, 1.0), default=None,
                   help="0..1: how strongly the object's hue follows the class (a global cue); default: the preset's")
    g.add_argument("--synthetic_clutter", type=float_range(0.0, 1.0), default=None,
                   help="0..1: clutter shapes and background colour spread (class-independent nuisance); "
                        "default: the preset's")


def _add_weights_source(g: argparse._ArgumentGroup, *, evaluate: bool) -> None:
    if evaluate:
        g.add_argument("--arch", default=None,
                       help="backbone (timm name or alias: swin_tiny, vit_small, ...); default: the --arch the "
                            "checkpoint was trained with, else vit_tiny")
        g.add_argument("--backbone_kwargs", type=json_object, default=None, metavar="JSON",
                       help='JSON dict of timm kwargs, e.g. \'{"depth": 4, "patch_size": 8}\'; default: the '
                            "checkpoint's training --backbone_kwargs, else {}")
    else:
        g.add_argument("--arch", default="resnet18", help="backbone (timm name or alias: swin_tiny, vit_small, ...)")
        g.add_argument("--backbone_kwargs", type=json_object, default=None, metavar="JSON",
                       help='JSON dict of timm kwargs, e.g. \'{"depth": 4, "patch_size": 8}\'; default at '
                            "global crops <= 96 px: SMALL_CROP_BACKBONE_KWARGS (vit_tiny: depth 4, width 96, patch 8; "
                            "resnet18: channels 16-32-64-128, stem 16, output stride 8), else {}")


def build_pretrain_parser() -> CommandParser:
    """The parser of ``cmd-fgvc pretrain`` (every option documented and range-checked)."""
    p = CommandParser(
        prog="cmd-fgvc pretrain",
        description="CMD self-supervised pretraining (defaults: a CPU demo on synthetic data, a few minutes).",
        epilog=EXIT_STATUS_EPILOG,
    )
    _add_config(p)
    g = p.add_argument_group("model")
    _add_weights_source(g, evaluate=False)
    g.add_argument("--init", type=str, default=None, metavar="FILE",
                   help="DINO / EsViT / CMD / timm checkpoint to start from (default: random weights)")
    g.add_argument("--init_key", type=str, default="teacher", help="key of the backbone weights in --init")
    g.add_argument("--init_partial", action="store_true",
                   help="start from the part of --init that fits the backbone (default: it must fit exactly)")
    g.add_argument("--out_dim", type=POSITIVE, default=128, help="K, prototypes of the heads (paper: 65536)")
    g.add_argument("--head_hidden_dim", type=POSITIVE, default=256, help="hidden width of the heads' MLP (paper: 2048)")
    g.add_argument("--head_bottleneck_dim", type=POSITIVE, default=64, help="bottleneck of the heads (paper: 256)")
    g.add_argument("--norm_last_layer", type=boolean, default=True, metavar="BOOL",
                   help="weight-normalise the prototype layer with a fixed norm (DINO's choice for stability)")
    g.add_argument("--mil_pooling", default="gated_attention",
                   choices=["mean", "sum", "max", "attention", "gated_attention"],
                   help="multi-instance pooling of the region tokens into a bag embedding")
    g.add_argument("--image_input", default="pooled", choices=["pooled", "mil"],
                   help="input of the image head: the backbone's pooled feature or the MIL bag embedding")
    g.add_argument("--head_bn", type=boolean, default=True, metavar="BOOL",
                   help="BatchNorm after the hidden layers of the heads' MLP (DINO's use_bn; SyncBatchNorm under "
                        "torch.distributed on GPUs, per-process statistics on the CPU); steadies the teacher against "
                        "collapse in short runs")
    g.add_argument("--share_prototypes", type=boolean, default=False, metavar="BOOL",
                   help="one prototype layer for the image and region heads")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default="cmd", choices=["dino", "esvit", "cmd"],
                   help="preset of loss terms: dino (image), esvit (image + region), cmd (all four)")
    for term, what in (("image", "image-level"), ("region", "region-level"), ("inter", "inter-level (MIL bag)"),
                       ("cross", "cross-level")):
        g.add_argument(f"--{term}_weight", type=NON_NEGATIVE_FLOAT, default=None,
                       help=f"weight of the {what} term (default: the --loss preset's)")
    g.add_argument("--teacher_temp", type=POSITIVE_FLOAT, default=0.03, help="teacher temperature after warm-up")
    g.add_argument("--warmup_teacher_temp", type=POSITIVE_FLOAT, default=0.03,
                   help="teacher temperature at the start of the warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", type=NON_NEGATIVE, default=0,
                   help="epochs of linear teacher-temperature warm-up")
    g.add_argument("--student_temp", type=POSITIVE_FLOAT, default=0.1, help="student temperature")
    g.add_argument("--center_momentum", type=FRACTION, default=0.9, help="EMA momentum of the teacher centers, in [0, 1]")
    g.add_argument("--centering", default="center", choices=["center", "sinkhorn"],
                   help="teacher normalisation: DINO's centering, or DINOv2's Sinkhorn-Knopp over the batch "
                        "(ignores --center_momentum)")
    g.add_argument("--koleo_weight", type=NON_NEGATIVE_FLOAT, default=0.0,
                   help="weight of DINOv2's KoLeo term on the student's pooled global-crop vectors; 0 = off")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=POSITIVE, default=10, help="training epochs")
    g.add_argument("--batch_size_per_gpu", type=POSITIVE, default=32, help="images per process and step")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=4e-3, help="peak lr at a total batch of 256 (scaled linearly)")
    g.add_argument("--min_lr", type=NON_NEGATIVE_FLOAT, default=1e-6, help="lr at the end of the cosine schedule")
    g.add_argument("--warmup_epochs", type=NON_NEGATIVE, default=1, help="epochs of linear lr warm-up")
    g.add_argument("--weight_decay", type=NON_NEGATIVE_FLOAT, default=0.04, help="weight decay at the start")
    g.add_argument("--weight_decay_end", type=NON_NEGATIVE_FLOAT, default=0.04,
                   help="weight decay at the end of the cosine schedule")
    g.add_argument("--momentum_teacher", type=FRACTION, default=0.99,
                   help="EMA momentum of the teacher at the start (cosine to 1), in [0, 1]")
    g.add_argument("--clip_grad", type=NON_NEGATIVE_FLOAT, default=3.0, help="per-parameter clipping norm; 0 disables")
    g.add_argument("--freeze_last_layer", type=NON_NEGATIVE, default=0,
                   help="epochs during which the prototype layers get no gradient")
    g.add_argument("--amp", default="off", choices=["bf16", "fp16", "off", "auto"],
                   help="mixed precision (auto: bf16 where supported)")
    g = p.add_argument_group("data")
    _add_data(g)
    g.add_argument("--global_size", type=POSITIVE, default=32, help="global crop size (paper: 224)")
    g.add_argument("--local_size", type=POSITIVE, default=16, help="local crop size (paper: 96)")
    g.add_argument("--local_crops_number", type=NON_NEGATIVE, default=4, help="local crops per image (paper: 8)")
    g.add_argument("--global_crops_scale", type=CROP_SCALE, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"),
                   help="area range of the global crops, 0 < MIN <= MAX <= 1")
    g.add_argument("--local_crops_scale", type=CROP_SCALE, nargs=2, default=(0.05, 0.4), metavar=("MIN", "MAX"),
                   help="area range of the local crops, 0 < MIN <= MAX <= 1")
    g.add_argument("--eval_size", type=POSITIVE, default=None,
                   help="k-NN evaluation image size (default: --global_size)")
    g.add_argument("--num_workers", type=NON_NEGATIVE, default=2,
                   help="data-loading processes (each augments with one thread; 0 augments in the main process)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", type=str, default="outputs/pretrain_demo", metavar="DIR",
                   help="checkpoint.pth, log.jsonl, args.json and pictures go here; a run resumes from it")
    g.add_argument("--saveckp_freq", type=NON_NEGATIVE, default=0,
                   help="also keep checkpoint{epoch:04}.pth every N epochs; 0: off")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of weights, data order and augmentations")
    g.add_argument("--device", type=device_name, default=None,
                   help="cuda | cuda:N | cpu | mps (default: cuda when available, else cpu)")
    g.add_argument("--knn_every", type=NON_NEGATIVE, default=0,
                   help="k-NN of the teacher every N epochs; 0: before and after training only")
    g.add_argument("--knn_k", type=POSITIVE, default=20, help="k of the k-NN monitor")
    g.add_argument("--no_knn", action="store_true",
                   help="skip the k-NN monitor (needed when the dataset has no test split)")
    g.add_argument("--supervised_reference", action="store_true",
                   help="after training, train the same backbone from the same initial weights with labels for "
                        "as many steps (one global crop per image, the same lr schedule), and print its k-NN beside "
                        "the teacher's: what labels reach in this budget (one process only; needs the k-NN monitor)")
    g.add_argument("--log_every", type=POSITIVE, default=10, help="read the loss on the host every N steps")
    g.add_argument("--stop_on_collapse", type=boolean, default=False, metavar="BOOL",
                   help="when the teacher collapses (uniform or one-hot, checked every --log_every steps), save "
                        "the checkpoint and stop with exit status 3 instead of only warning")
    g.add_argument("--max_steps", type=NON_NEGATIVE, default=0,
                   help="stop this run after N steps (saving a checkpoint), as an interruption would; 0: off")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones and heads")
    g.add_argument("--fused_region_chunk", type=NON_NEGATIVE, default=0,
                   help="fuse the region prototype layer with the loss in chunks of N crops-of-images "
                        "(never materialises [tokens, K] student logits; saves memory); 0: off")
    g.add_argument("--viz", action="store_true",
                   help="at the end, save training curves, region-weight overlays across classes and an "
                        "embedding plot of the teacher's features")
    g.add_argument("--no_progress", action="store_true", help="no progress bars (one summary line per epoch)")
    g.add_argument("--logger", type=logger_list, default="csv",
                   help="per-step scalars (loss terms, schedules, teacher entropies, throughput) at the --log_every "
                        "cadence: comma-separated csv (output_dir/steps.csv), tensorboard (output_dir/tensorboard; "
                        "pip install 'cmd-fgvc[tracking]'), none")
    return p


def build_evaluate_parser() -> CommandParser:
    """The parser of ``cmd-fgvc evaluate`` (every option documented and range-checked)."""
    p = CommandParser(
        prog="cmd-fgvc evaluate",
        description="Evaluate a frozen (teacher) backbone: k-NN, linear probe or retrieval. The architecture, "
        "backbone settings and evaluation image size are read from a cmd-fgvc checkpoint's training "
        "arguments when present; command-line values override them.",
        epilog="example: cmd-fgvc evaluate knn --pretrained_weights outputs/pretrain_demo/checkpoint.pth",
    )
    p.add_argument("protocol", choices=["knn", "linear", "retrieval"],
                   help="knn: weighted k-NN; linear: linear probe on frozen features; retrieval: rank-k and mAP")
    _add_config(p)
    g = p.add_argument_group("weights")
    g.add_argument("--pretrained_weights", type=str, default=None, metavar="FILE",
                   help="checkpoint (cmd-fgvc, DINO, EsViT or timm); default: a randomly initialised "
                        "backbone (a baseline)")
    g.add_argument("--checkpoint_key", type=str, default="teacher", help="network of a training checkpoint to take")
    g.add_argument("--trust_pickle", action="store_true",
                   help="allow old pickled checkpoints (runs code from the file: only for files you trust)")
    _add_weights_source(g, evaluate=True)
    g = p.add_argument_group("data")
    _add_data(g)
    g.add_argument("--image_size", type=POSITIVE, default=None,
                   help="evaluation image size; default: the checkpoint's k-NN size (--eval_size, else "
                        "--global_size), else --synthetic_image_size for synthetic data and 224 for real data")
    g.add_argument("--batch_size_per_gpu", type=POSITIVE, default=64, help="images per process and step")
    g.add_argument("--num_workers", type=NON_NEGATIVE, default=0, help="data-loading processes")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed (synthetic data, label subsets, linear probe)")
    g.add_argument("--device", type=device_name, default=None,
                   help="cuda | cuda:N | cpu | mps (default: cuda when available, else cpu)")
    g.add_argument("--output_dir", type=str, default="outputs/evaluate", metavar="DIR",
                   help="results.json (and the linear probe) go here")
    g.add_argument("--dump_features", type=str, default=None, metavar="DIR",
                   help="save the extracted features to this folder")
    g.add_argument("--load_features", type=str, default=None, metavar="DIR",
                   help="reuse features saved by --dump_features (no backbone is run)")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("k-NN")
    g.add_argument("--nb_knn", type=POSITIVE, nargs="+", default=[10, 20, 100, 200], metavar="K",
                   help="values of k (k=20 is the paper's headline)")
    g.add_argument("--temperature", type=POSITIVE_FLOAT, default=0.07, help="temperature of the k-NN vote weights")
    g.add_argument("--label_fraction", type=float_range(0.0, 1.0, low_open=True), default=None,
                   help="keep a class-balanced fraction (0, 1] of the train labels (default: all)")
    g = p.add_argument_group("linear probe")
    g.add_argument("--n_last_blocks", type=POSITIVE, default=4, help="concatenate the class tokens of the last N blocks")
    g.add_argument("--avgpool_patchtokens", action="store_true", help="also concatenate the mean patch token")
    g.add_argument("--epochs", type=POSITIVE, default=100, help="training epochs of the probe")
    g.add_argument("--lr", type=POSITIVE_FLOAT, default=None, help="learning rate (default: 1e-3 * total batch / 256)")
    g.add_argument("--lrs", type=POSITIVE_FLOAT, nargs="+", default=None, metavar="LR",
                   help="train one head per learning rate, report the best (default: only --lr)")
    g.add_argument("--num_labels", type=int_range(2), default=None, help="number of classes (default: from the data)")
    g.add_argument("--cache_features", action="store_true", help="extract once without augmentation, train on it")
    g = p.add_argument_group("retrieval")
    g.add_argument("--every", type=int_range(2), default=9,
                   help="queries: the test images whose index is a multiple of N; gallery: train + the rest")
    g.add_argument("--map_at", type=POSITIVE, default=100, help="mAP@R cut-off")
    return p


# ---------------------------------------------------------------------------------------- config


def _load_mapping(parser: argparse.ArgumentParser, path: Path) -> dict:
    if not path.is_file():
        parser.error(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            try:
                import yaml
            except ImportError:  # pragma: no cover - pyyaml is a dev dependency
                if path.suffix.lower() in (".yaml", ".yml"):
                    parser.error(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml), or use JSON")
                values = json.loads(text)
            else:
                values = yaml.safe_load(text)
    except ValueError as err:  # json.JSONDecodeError and yaml.YAMLError (below) alike
        parser.error(f"--config {path}: not valid JSON/YAML: {str(err).splitlines()[0]}")
    except Exception as err:  # yaml.YAMLError
        parser.error(f"--config {path}: not valid YAML: {' '.join(str(err).split())[:200]}")
    if values is None:  # an empty file
        return {}
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option names to values (e.g. 'epochs: 10'), "
                     f"got a {type(values).__name__}")
    return values


def _token(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def config_tokens(parser: CommandParser, path: str | Path) -> list[str]:
    """The command-line tokens equivalent to a YAML/JSON config file, for `parser`.

    Keys are option names (``epochs`` or ``--epochs``); lists give multi-value options, ``true`` /
    ``false`` give flags, ``null`` leaves an option whose default is none at its default. The tokens
    end with ``--config FILE`` so that a multi-value option never swallows what follows.

    Raises:
        SystemExit: (through ``parser.error``) a missing or unreadable file, not a mapping, an unknown
            key, a positional argument, ``null`` for an option with a default, a list for a one-value
            option or a non-boolean for a flag; the message names the file and the key.
    """
    path = Path(path)
    values = _load_mapping(parser, path)
    options = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    positionals = {a.dest for a in parser._actions if not a.option_strings}
    unknown = [str(k) for k in values if str(k).lstrip("-") not in options]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.lstrip("-"), list(options), n=1)
            if key in positionals:
                hints.append(f"{key} (give it on the command line)")
            else:
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        parser.error(f"--config {path}: unknown option(s): {', '.join(hints)}")
    tokens: list[str] = []
    where = str(path)
    for key, value in values.items():
        action = options[str(key).lstrip("-")]
        flag = action.option_strings[-1]
        what = f"--config {path}: {action.dest}"
        if value is None:
            if action.default is None:
                continue
            parser.error(f"{what}: null is not allowed (its default is {_token(action.default)}; leave the key out)")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                parser.error(f"{what}: expected true or false, got {value!r}")
            if value:
                tokens.append(flag)
            parser.config_origin[flag] = where
            continue
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            items = list(value) if isinstance(value, list | tuple) else [value]
            if any(isinstance(v, list | dict) for v in items):
                parser.error(f"{what}: expected a list of plain values, got {value!r}")
            tokens += [flag, *(_token(v) for v in items)]
        else:
            if isinstance(value, list | tuple):
                parser.error(f"{what}: expected one value, got the list {value!r}")
            if isinstance(value, dict) and action.type is not json_object:
                parser.error(f"{what}: expected one value, got the mapping {value!r}")
            tokens.append(f"{flag}={_token(value)}")
        parser.config_origin[flag] = where
    return [*tokens, "--config", str(path)] if tokens else []


def parse_with_config(parser: CommandParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) with ``--config FILE`` values placed before it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    tokens = config_tokens(parser, known.config) if known.config and not known.help else []
    for flag in list(parser.config_origin):  # the command line wins: an error there is not the file's
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            del parser.config_origin[flag]
    return parser.parse_args([*tokens, *argv])


def _check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    if device is None or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device} was asked for but no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use --device cpu or leave --device out")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            parser.error(f"argument --device: {device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        parser.error("argument --device: mps was asked for but is not available here; use --device cpu")


def _check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.dataset != "synthetic":
        if args.data_path is None:
            parser.error(f"argument --data_path: required for --dataset {args.dataset}")
        if not Path(args.data_path).is_dir():
            parser.error(f"argument --data_path: no such folder: {args.data_path}")


def parse_pretrain_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``cmd-fgvc pretrain`` options (``--config FILE`` first, the command line over it).

    Besides each option's own range, checks that crop scales are increasing, that a real dataset
    has an existing ``--data_path`` and that a requested ``--device`` exists, and fills the demo's
    ``--backbone_kwargs`` default.
    """
    parser = build_pretrain_parser()
    args = parse_with_config(parser, argv)
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        if low > high:
            parser.error(f"argument --{name}: must be increasing (MIN <= MAX), got {low:g} {high:g}")
        setattr(args, name, (low, high))
    _check_data(parser, args)
    if args.dataset == "imagefolder" and not args.no_knn and not (Path(args.data_path) / "test").is_dir():
        parser.error(f"argument --data_path: {args.data_path} has no test/ folder, which the k-NN monitor needs: "
                     "pass --no_knn, or lay out DATA/train/<class>/<image> and DATA/test/<class>/<image>")
    if args.supervised_reference and args.no_knn:
        parser.error("argument --supervised_reference: compares k-NN top-1, which --no_knn turns off")
    _check_device(parser, args.device)
    if args.backbone_kwargs is None:
        small = SMALL_CROP_BACKBONE_KWARGS.get(args.arch, {}) if args.global_size <= 96 else {}
        args.backbone_kwargs = json.loads(json.dumps(small))  # a copy
    return args


def parse_evaluate_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``cmd-fgvc evaluate`` options (``--config FILE`` first, the command line over it).

    ``--arch``, ``--backbone_kwargs`` and ``--image_size`` stay None when not given: the command
    fills them from the checkpoint (see `cmd.cli.evaluate.apply_checkpoint_args`).
    """
    parser = build_evaluate_parser()
    args = parse_with_config(parser, argv)
    if args.load_features is None:
        _check_data(parser, args)
    elif not Path(args.load_features).is_dir():
        parser.error(f"argument --load_features: no such folder: {args.load_features}")
    if args.pretrained_weights is not None and not Path(args.pretrained_weights).is_file():
        parser.error(f"argument --pretrained_weights: no such file: {args.pretrained_weights}")
    _check_device(parser, args.device)
    return args
