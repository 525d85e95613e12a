"""Options of the ``cmd-fgvc`` commands: one typed schema, a recipe, ``--config FILE`` and flags.

The options are dataclass fields (`cmd.recipes.schema.Config` for the method, optimisation and crops,
`PretrainOptions` / `EvaluateOptions` for the plumbing); the argparse parsers are generated from them.
``cmd-fgvc pretrain`` resolves every option from, in increasing precedence: the schema's default
(plumbing options only), the recipe (``--recipe NAME``, else ``demo`` for ``--dataset synthetic`` and
``paper`` / ``paper-cars`` for a real dataset), the ``--config FILE`` mapping, the command-line flags.
A run never mixes two recipes. Every value, wherever it comes from, goes through the same checker; an
error is one line naming the option and, when the value came from a file, the file. A file that is
not a mapping, an unknown key (with the closest option), or ``null`` for an option that takes no
``null`` is refused with the file's name. ``--print_config`` prints the resolved options as YAML,
each with its source, and exits.

Example:
    >>> from cmd.cli.options import parse_pretrain_args
    >>> args = parse_pretrain_args(["--epochs", "3"])
    >>> args.recipe, args.epochs, args.lr
    ('demo', 3, 0.004)
    >>> parse_pretrain_args(["--log_every", "0"])  # doctest: +SKIP
    cmd-fgvc pretrain: error: argument --log_every: must be >= 1, got 0 (see cmd-fgvc pretrain --help)
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmd import recipes
from cmd.cli.exit_status import EXIT_STATUS_EPILOG
from cmd.cli.loggers import parse_logger_names
from cmd.recipes.schema import (
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
    Config,
    OptionError,
    boolean,
    device_name,
    float_range,
    int_range,
    json_object,
    option,
    option_specs,
    optional,
    path,
    switch,
    text,
    values,
)

__all__ = [
    "CommandParser",
    "EvaluateOptions",
    "PretrainOptions",
    "build_evaluate_parser",
    "build_pretrain_parser",
    "parse_evaluate_args",
    "parse_pretrain_args",
]

DATASETS = ("synthetic", "digits", "cub", "cars", "aircraft", "imagefolder")
FILELESS_DATASETS = ("synthetic", "digits")  # no --data_path
# cmd.data.synthetic.DIFFICULTIES and "broad" (cmd.data.SyntheticBroad); spelled out so --help stays torch-free
SYNTHETIC_DIFFICULTIES = ("hard", "medium", "easy", "demo", "broad")
OPT_PATH, OPT_INT, OPT_JSON = optional(path), optional(POSITIVE), optional(json_object)


def logger_list(value: Any) -> str:
    """``--logger``: a comma-separated list of `cmd.cli.loggers.LOGGER_CHOICES` (kept as given)."""
    try:
        parse_logger_names(text(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _data_options(default_difficulty: str) -> dict[str, Any]:
    """The dataset options both commands share (fields of the two schemas)."""
    return dict(
        dataset=option("data", "synthetic fine-grained data (no files needed), digits (scikit-learn's bundled "
                       "8 x 8 handwritten digits at 32 px, no download; pip install cmd-fgvc[viz]), a named "
                       "benchmark, or an ImageFolder tree DATA/train/<class>/<image> and DATA/test/<class>/<image>", text,
                       default="synthetic", choices=DATASETS),
        data_path=option("data", "dataset root (required for every --dataset but synthetic and digits)", OPT_PATH,
                         default=None, metavar="DIR"),
        synthetic_classes=option("data", "classes of the synthetic data", int_range(2), default=10),
        synthetic_per_class=option("data", "synthetic images per class and split", POSITIVE, default=100),
        synthetic_image_size=option("data", "side of the synthetic images", int_range(16), default=32),
        synthetic_difficulty=option(
            "data", "preset of the synthetic data (cmd.SyntheticFineGrained): hard = a 4 x 4-cell part on 20 % of "
            "the side (the method benchmark); medium = a 3 x 3-cell part on 30 % of the side with clutter (random "
            "init near chance, learnable with labels in a CPU budget); easy = a 3 x 3-cell part on 40 % of the side; "
            "demo = easy without clutter, on a calm background (what self-supervision learns visibly on a CPU); "
            "broad = all four kinds of scene with 4 x 4-cell parts, --synthetic_classes (a multiple of 4) shared "
            "among them (cmd.SyntheticBroad: the generic data of a two-stage protocol's first stage)", text,
            default=default_difficulty, choices=SYNTHETIC_DIFFICULTIES),
        synthetic_class_hue=option("data", "0..1: how strongly the object's hue follows the class (a global cue); "
                                   "null: the preset's", optional(float_range(0.0, 1.0)), default=None),
        synthetic_clutter=option("data", "0..1: clutter shapes and background colour spread (class-independent "
                                 "nuisance); null: the preset's", optional(float_range(0.0, 1.0)), default=None),
    )


def _schema(name: str, base: type | None, fields: dict[str, Any], doc: str) -> type:
    """A frozen, keyword-only dataclass of ``fields`` (name -> `option` field), extending ``base``."""
    annotations = [(k, Any, v) for k, v in fields.items()]
    namespace: dict[str, Any] = {"__doc__": doc, "__module__": __name__}
    if base is None:  # every field checked as Config's are, no checks across options
        namespace.update(__post_init__=Config.__post_init__, check=lambda self: None)
    return dataclasses.make_dataclass(name, annotations, bases=(base,) if base else (), frozen=True, kw_only=True,
                                      namespace=namespace)


PretrainOptions = _schema("PretrainOptions", Config, {
    "init": option("model", "DINO / EsViT / CMD / timm checkpoint to start from; null: random weights", OPT_PATH,
                   default=None, metavar="FILE"),
    "init_key": option("model", "key of the backbone weights in --init", text, default="teacher"),
    "init_partial": option("model", "start from the part of --init that fits the backbone (default: it must "
                           "fit exactly)", switch, default=False),
    **_data_options("demo"),
    "eval_size": option("data", "k-NN evaluation image size; null: --global_size", OPT_INT, default=None),
    "num_workers": option("data", "data-loading processes (each augments with one thread; 0 augments in the "
                          "main process)", NON_NEGATIVE, default=2),
    "output_dir": option("run", "checkpoint.pth, log.jsonl, args.json and pictures go here; a run resumes "
                         "from it; null: outputs/pretrain_RECIPE", OPT_PATH, default=None, metavar="DIR"),
    "seed": option("run", "seed of weights, data order and augmentations", NON_NEGATIVE, default=0),
    "device": option("run", "cuda | cuda:N | cpu | mps; null: cuda when available, else cpu",
                     optional(device_name), default=None),
    "knn_every": option("run", "k-NN of the teacher every N epochs; 0: before and after training only",
                        NON_NEGATIVE, default=0),
    "knn_k": option("run", "k of the k-NN monitor", POSITIVE, default=20),
    "no_knn": option("run", "skip the k-NN monitor (needed when the dataset has no test split)", switch,
                     default=False),
    "supervised_reference": option(
        "run", "after training, train the same backbone from the same initial weights with labels for as many "
        "steps (one global crop per image, the same lr schedule), and print its k-NN beside the teacher's: what "
        "labels reach in this budget (one process only; needs the k-NN monitor)", switch, default=False),
    "log_every": option("run", "read the loss on the host every N steps", POSITIVE, default=10),
    "stop_on_collapse": option("run", "when the teacher collapses (uniform or one-hot, checked every --log_every "
                               "steps), save the checkpoint and stop with exit status 3 instead of only warning",
                               boolean, default=False, metavar="BOOL"),
    "max_steps": option("run", "stop this run after N steps (saving a checkpoint), as an interruption would; "
                        "0: off", NON_NEGATIVE, default=0),
    "compile": option("run", "torch.compile the backbones and heads", switch, default=False),
    "fused_region_chunk": option("run", "fuse the region prototype layer with the loss in chunks of N "
                                 "crops-of-images (never materialises [tokens, K] student logits; saves memory); "
                                 "0: off", NON_NEGATIVE, default=0),
    "viz": option("run", "at the end, save training curves, region-weight overlays across classes and an "
                  "embedding plot of the teacher's features", switch, default=False),
    "no_progress": option("run", "no progress bars (one summary line per epoch)", switch, default=False),
    "logger": option("run", "per-step scalars (loss terms, schedules, teacher entropies, throughput) at the "
                     "--log_every cadence: comma-separated csv (output_dir/steps.csv), tensorboard "
                     "(output_dir/tensorboard; pip install 'cmd-fgvc[tracking]'), none", logger_list,
                     default="csv"),
}, "The options of ``cmd-fgvc pretrain``: a recipe's `Config` and the run's plumbing (with defaults).")

EvaluateOptions = _schema("EvaluateOptions", None, {
    "pretrained_weights": option("weights", "checkpoint (cmd-fgvc, DINO, EsViT or timm); null: a randomly "
                                 "initialised backbone (a baseline)", OPT_PATH, default=None, metavar="FILE"),
    "checkpoint_key": option("weights", "network of a training checkpoint to take", text, default="teacher"),
    "trust_pickle": option("weights", "allow old pickled checkpoints (runs code from the file: only for files "
                           "you trust)", switch, default=False),
    "arch": option("weights", "backbone (timm name or alias: swin_tiny, vit_small, ...); null: the --arch the "
                   "checkpoint was trained with, else vit_tiny", optional(text), default=None),
    "backbone_kwargs": option("weights", 'JSON dict of timm kwargs, e.g. \'{"depth": 4, "patch_size": 8}\'; '
                              "null: the checkpoint's training --backbone_kwargs, else {}", OPT_JSON, default=None,
                              metavar="JSON"),
    **_data_options("demo"),
    "image_size": option("data", "evaluation image size; null: the checkpoint's k-NN size (--eval_size, else "
                         "--global_size), else --synthetic_image_size for synthetic data and 224 for real data",
                         OPT_INT, default=None),
    "batch_size_per_gpu": option("data", "images per process and step", POSITIVE, default=64),
    "num_workers": option("data", "data-loading processes", NON_NEGATIVE, default=0),
    "seed": option("run", "seed (synthetic data, label subsets, linear probe)", NON_NEGATIVE, default=0),
    "device": option("run", "cuda | cuda:N | cpu | mps; null: cuda when available, else cpu",
                     optional(device_name), default=None),
    "output_dir": option("run", "results.json (and the linear probe) go here", path, default="outputs/evaluate",
                         metavar="DIR"),
    "dump_features": option("run", "save the extracted features to this folder", OPT_PATH, default=None,
                            metavar="DIR"),
    "load_features": option("run", "reuse features saved by --dump_features (no backbone is run)", OPT_PATH,
                            default=None, metavar="DIR"),
    "no_progress": option("run", "no progress bars", switch, default=False),
    "nb_knn": option("k-NN", "values of k (k=20 is the paper's headline)", values(POSITIVE), default=(10, 20, 100, 200),
                     nargs="+", metavar="K"),
    "temperature": option("k-NN", "temperature of the k-NN vote weights", POSITIVE_FLOAT, default=0.07),
    "label_fraction": option("k-NN", "keep a class-balanced fraction (0, 1] of the train labels; null: all",
                             optional(float_range(0.0, 1.0, low_open=True)), default=None),
    "n_last_blocks": option("linear probe", "concatenate the class tokens of the last N blocks", POSITIVE,
                            default=4),
    "avgpool_patchtokens": option("linear probe", "also concatenate the mean patch token", switch, default=False),
    "epochs": option("linear probe", "training epochs of the probe", POSITIVE, default=100),
    "lr": option("linear probe", "one learning rate, no validation split; null: the --lrs sweep",
                 optional(POSITIVE_FLOAT), default=None),
    "lrs": option("linear probe", "one head per learning rate, the best on --val_fraction of the training split is "
                  "retrained on all of it; null: 1e-3 * total batch / 256 times 1, 3, 10, ..., 10000",
                  optional(values(POSITIVE_FLOAT)), default=None, nargs="+", metavar="LR"),
    "val_fraction": option("linear probe", "class-balanced share of the training split held out to pick the lr "
                           "(never the test split)", float_range(0.0, 1.0, low_open=True, high_open=True),
                           default=0.1),
    "official": option("linear probe", "the official eval_linear.py protocol: one lr, 1e-3 * total batch / 256, "
                       "augmented images; its best test top-1 over the epochs is reported beside the last epoch's",
                       switch, default=False),
    "num_labels": option("linear probe", "number of classes; null: from the data", optional(int_range(2)),
                         default=None),
    "cache_features": option("linear probe", "extract once without augmentation, train on it", switch,
                             default=False),
    "every": option("retrieval", "queries: the test images whose index is a multiple of N; gallery: train + the "
                    "rest", int_range(2), default=9),
    "map_at": option("retrieval", "mAP@R cut-off", POSITIVE, default=100),
}, "The options of ``cmd-fgvc evaluate`` (all with defaults; no recipe).")

# former option names (flag or --config key) -> current names; accepted with a deprecation note
RENAMED_OPTIONS = {"cross_weight": "swapped_weight"}

# options of the command line only: never in a --config file
_COMMAND_LINE_ONLY = {"config", "print_config", "protocol"}


# ---------------------------------------------------------------------------------------- parser


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line (the options are listed by ``--help``)."""

    def __init__(self, *args: Any, resolve: Any = None, **kwargs: Any) -> None:
        self.resolve = resolve  # the command's parse function: parse_args(args) resolves every option
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("argument_default", argparse.SUPPRESS)  # only what is given: the layers merge
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        """The command's full resolution (`parse_pretrain_args` / `parse_evaluate_args`) of ``args``."""
        return self.resolve(args)

    def given(self, args: Sequence[str]) -> dict[str, Any]:
        """Only the options given in ``args`` (the command-line layer of the resolution)."""
        return vars(super().parse_args(args))


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def _help(name: str, spec: Any, default: Any) -> str:
    """The help text, with the default or, for a recipe option, the demo's and the paper's values."""
    shown = spec.help
    if spec.in_recipe:
        demo, paper = recipes.load("demo").values[name], recipes.load("paper").values[name]
        shown += f" (demo: {_shown(demo)}; paper: {_shown(paper)})"
    elif default not in (None, False, dataclasses.MISSING) and "default" not in shown:
        shown += f" (default: {_shown(default)})"
    return shown.replace("%", "%%")


def _build(schema: type, resolve: Any, prog: str, description: str, epilog: str | None = None) -> CommandParser:
    p = CommandParser(prog=prog, description=description, epilog=epilog, resolve=resolve)
    p.add_argument("--config", type=path, default=None, metavar="FILE",
                   help="YAML or JSON mapping of option names to values (e.g. 'epochs: 100'); it overrides the "
                        "recipe, and options given on the command line override it")
    groups: dict[str, Any] = {}
    defaults = {f.name: f.default for f in dataclasses.fields(schema)}
    for name, spec in option_specs(schema).items():
        group = groups.get(spec.group) or groups.setdefault(spec.group, p.add_argument_group(spec.group))
        help_text = _help(name, spec, defaults[name])
        if spec.switch:
            group.add_argument(f"--{name}", action="store_true", help=help_text)
        else:  # the text is checked by the schema (the same checker as a file's or a recipe's value)
            group.add_argument(f"--{name}", choices=spec.choices, nargs=spec.nargs, metavar=spec.metavar,
                               help=help_text)
    for old, new in RENAMED_OPTIONS.items():
        spec = option_specs(schema).get(new)
        if spec is not None:
            p.add_argument(f"--{old}", nargs=spec.nargs, metavar=spec.metavar, help=f"deprecated name of --{new}")
    return p


def build_pretrain_parser() -> CommandParser:
    """The parser of ``cmd-fgvc pretrain`` (generated from `PretrainOptions`)."""
    p = _build(PretrainOptions, parse_pretrain_args, "cmd-fgvc pretrain",
               "CMD self-supervised pretraining. Every method, optimisation and crop option comes from a recipe "
               "(cmd-fgvc recipes lists them; default: demo, a CPU run of a few minutes, for --dataset synthetic, "
               "and paper for a real dataset); --config FILE overrides the recipe, flags override both.", EXIT_STATUS_EPILOG)
    p.add_argument("--recipe", choices=recipes.names(), metavar="NAME",
                   help=f"training recipe: {', '.join(recipes.names())}; default: demo for --dataset synthetic and digits, "
                        "paper-cars for --dataset cars, paper for the other datasets")
    p.add_argument("--print_config", action="store_true", default=False,
                   help="print the resolved options as YAML (loadable by --config), each with its source, and exit")
    return p


def build_evaluate_parser() -> CommandParser:
    """The parser of ``cmd-fgvc evaluate`` (generated from `EvaluateOptions`)."""
    p = _build(EvaluateOptions, parse_evaluate_args, "cmd-fgvc evaluate",
               "Evaluate a frozen (teacher) backbone: k-NN, linear probe or retrieval. The architecture, backbone "
               "settings and evaluation image size are read from a cmd-fgvc checkpoint's training arguments when "
               "present; command-line values override them.",
               "example: cmd-fgvc evaluate knn --pretrained_weights outputs/pretrain_demo/checkpoint.pth")
    p.add_argument("protocol", choices=["knn", "linear", "retrieval"], nargs="?", default=None,
                   help="knn: weighted k-NN; linear: linear probe on frozen features; retrieval: rank-k and mAP")
    return p


# ------------------------------------------------------------------------------------- resolution


def _read_config(parser: CommandParser, file: str, known: set[str]) -> dict[str, Any]:
    """The mapping of a YAML/JSON config file; refuses (one line, naming the file) what cannot be an option."""
    where = Path(file)
    if not where.is_file():
        parser.error(f"--config {file}: no such file")
    try:
        content = where.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        parser.error(f"--config {file}: not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r})")
    except OSError as err:
        parser.error(f"--config {file}: cannot be read ({err.strerror})")
    try:
        if where.suffix.lower() == ".json":
            data = json.loads(content)
        else:
            import yaml

            data = yaml.safe_load(content)
    except ValueError as err:  # json.JSONDecodeError
        parser.error(f"--config {file}: not valid JSON/YAML: {str(err).splitlines()[0]}")
    except Exception as err:  # yaml.YAMLError
        parser.error(f"--config {file}: not valid YAML: {' '.join(str(err).split())[:200]}")
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict):
        parser.error(f"--config {file}: expected a mapping of option names to values (e.g. 'epochs: 10'), "
                     f"got a {type(data).__name__}")
    data = _renamed({str(k).lstrip("-"): v for k, v in data.items()}, f"--config {file}: ", known)
    unknown = [k for k in data if k not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            if key in _COMMAND_LINE_ONLY:
                hints.append(f"{key} (give it on the command line)")
            else:
                hints.append(f"{key} (did you mean {close[0]}?)" if close else key)
        parser.error(f"--config {file}: unknown option(s): {', '.join(hints)}")
    return data


def _renamed(values: dict[str, Any], where: str, known: set[str] | dict) -> dict[str, Any]:
    """``values`` with former option names (`RENAMED_OPTIONS`) replaced by the current ones, with a note."""
    out = {}
    for key, value in values.items():
        new = RENAMED_OPTIONS.get(key)
        if new is not None and new in known:
            message = f"{where}{key} is deprecated: use {where if where == '--' else ''}{new}"
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            print(f"note: {message}", file=sys.stderr)
            key = new
        out[key] = value
    return out


def _resolve(parser: CommandParser, schema: type, argv: Sequence[str] | None, *, with_recipe: bool):
    """(options, namespace of the command-line-only arguments, source of each option)."""
    flags = _renamed(parser.given(list(sys.argv[1:] if argv is None else argv)), "--", option_specs(schema))
    specs = option_specs(schema)
    defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    cli_only = argparse.Namespace(**{k: flags.pop(k) for k in list(flags) if k not in specs})
    file = getattr(cli_only, "config", None)
    from_file = _read_config(parser, file, set(specs) | ({"recipe"} if with_recipe else set())) if file else {}
    for name, value in from_file.items():  # null only where the option takes null
        if value is None and name in specs:
            try:
                specs[name].check(None)
            except (argparse.ArgumentTypeError, TypeError, ValueError, AttributeError):
                default = f"its default is {_shown(defaults[name])}; leave the key out" if name in defaults else \
                    "the recipe sets it; leave the key out"
                parser.error(f"--config {file}: {name}: null is not allowed ({default})")
    sources = {k: "default" for k in defaults}
    merged = dict(defaults)
    if with_recipe:
        name, why = _recipe_name(parser, cli_only, from_file, {**merged, **from_file, **flags}, file)
        recipe = recipes.load(name)
        merged.update(recipe.values)
        sources.update({k: f"recipe {name}" for k in recipe.values})
        cli_only.recipe, cli_only.recipe_source = name, why
    merged.update(from_file)
    sources.update({k: f"file {file}" for k in from_file})
    merged.update(flags)
    sources.update({k: "flag" for k in flags})
    given = {**from_file, **flags}
    if with_recipe and "arch" in given and "backbone_kwargs" not in given and given["arch"] != recipe.values["arch"]:
        # the recipe's backbone kwargs belong to its own backbone: another --arch is timm's model as it is
        merged["backbone_kwargs"] = {}
        sources["backbone_kwargs"] = f"default for --arch {given['arch']} (the recipe's are for {recipe.values['arch']})"
    merged.pop("recipe", None)
    if with_recipe and merged.get("output_dir") is None:
        merged["output_dir"] = f"outputs/pretrain_{cli_only.recipe}"
    try:
        options = schema(**merged)
    except OptionError as err:
        _fail(parser, err.option, err.message, sources)
    return options, cli_only, sources


def _recipe_name(parser: CommandParser, cli_only: argparse.Namespace, from_file: dict, merged: dict,
                 file: str | None) -> tuple[str, str]:
    """The recipe of the run and why: the flag, the file's ``recipe:`` key, or the dataset's default."""
    flag, in_file = getattr(cli_only, "recipe", None), from_file.get("recipe")
    if in_file is not None and in_file not in recipes.names():
        close = difflib.get_close_matches(str(in_file), recipes.names(), n=1)
        parser.error(f"--config {file}: recipe: unknown recipe {in_file!r}"
                     + (f" (did you mean {close[0]}?)" if close else f"; choose one of {', '.join(recipes.names())}"))
    if flag and in_file and flag != in_file:  # a run never mixes two recipes
        parser.error(f"argument --recipe: {flag} conflicts with 'recipe: {in_file}' in --config {file}; "
                     "a run has one recipe: drop one of them")
    if flag:
        return flag, "--recipe"
    if in_file:
        return in_file, f"recipe: in {file}"
    dataset = merged.get("dataset", "synthetic")
    return recipes.default_for_dataset(dataset), f"default for --dataset {dataset}"


def _fail(parser: CommandParser, name: str, message: str, sources: dict[str, str]) -> None:
    source = sources.get(name, "flag")
    where = ""
    if source.startswith("file "):
        where = f" (set in {source[5:]})"
    elif source.startswith("recipe "):
        where = f" (from the {source})"
    parser.error(f"argument --{name}: {message}{where}")


def _namespace(options: Any, cli_only: argparse.Namespace) -> argparse.Namespace:
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return argparse.Namespace(**values, **vars(cli_only))


def print_config(args: argparse.Namespace, sources: dict[str, str], schema: type | None = None) -> str:
    """The resolved options as YAML, one ``option: value  # source`` per line (loadable by ``--config``)."""
    import yaml

    lines = ["# cmd-fgvc pretrain, resolved options (load with --config FILE; flags override it)",
             f"recipe: {args.recipe}  # {args.recipe_source}"]
    for name in option_specs(schema or PretrainOptions):
        value = getattr(args, name)
        value = list(value) if isinstance(value, tuple) else value
        shown = yaml.safe_dump({name: value}, default_flow_style=True, width=10**9, sort_keys=False).strip()[1:-1]
        lines.append(f"{shown}  # {sources[name]}")
    return "\n".join(lines) + "\n"


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
    if args.dataset not in FILELESS_DATASETS:
        if args.data_path is None:
            parser.error(f"argument --data_path: required for --dataset {args.dataset}")
        if not Path(args.data_path).is_dir():
            parser.error(f"argument --data_path: no such folder: {args.data_path}")


def parse_pretrain_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``cmd-fgvc pretrain`` options: recipe < ``--config FILE`` < flags (see the module's docstring).

    Besides each option's own range and the checks across options (`cmd.recipes.Config.check`),
    checks that a real dataset has an existing ``--data_path``, that ``--arch`` names a backbone, that
    a recipe needing ``--init`` has it and that a requested ``--device`` exists. The namespace holds
    every option, ``recipe`` (its name) and ``recipe_source`` (why it was chosen). ``--print_config``
    prints the options and exits with status 0.
    """
    parser = build_pretrain_parser()
    options, cli_only, sources = _resolve(parser, PretrainOptions, argv, with_recipe=True)
    args = _namespace(options, cli_only)
    _check_data(parser, args)
    if args.dataset == "imagefolder" and not args.no_knn and not (Path(args.data_path) / "test").is_dir():
        parser.error(f"argument --data_path: {args.data_path} has no test/ folder, which the k-NN monitor needs: "
                     "pass --no_knn, or lay out DATA/train/<class>/<image> and DATA/test/<class>/<image>")
    if args.supervised_reference and args.no_knn:
        parser.error("argument --supervised_reference: compares k-NN top-1, which --no_knn turns off")
    requires_init = recipes.load(args.recipe).requires_init
    if requires_init and args.init is None:
        parser.error(f"argument --init: --recipe {args.recipe} starts from {requires_init}: pass --init FILE")
    if args.print_config:
        sys.stdout.write(print_config(args, sources))
        sys.stdout.flush()
        raise SystemExit(0)
    del args.print_config  # (not a training argument: args.json and the checkpoint do not list it)
    try:
        from cmd.backbones.factory import resolve_model_name

        resolve_model_name(args.arch)
    except ValueError as err:
        _fail(parser, "arch", str(err), sources)
    _check_device(parser, args.device)
    return args


def parse_evaluate_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``cmd-fgvc evaluate`` options (``--config FILE`` first, the command line over it).

    ``--arch``, ``--backbone_kwargs`` and ``--image_size`` stay None when not given: the command
    fills them from the checkpoint (see `cmd.cli.evaluate.apply_checkpoint_args`).
    """
    parser = build_evaluate_parser()
    options, cli_only, _ = _resolve(parser, EvaluateOptions, argv, with_recipe=False)
    args = _namespace(options, cli_only)
    if getattr(args, "protocol", None) is None:
        parser.error("the following arguments are required: protocol (knn, linear or retrieval)")
    if args.load_features is None:
        _check_data(parser, args)
    elif not Path(args.load_features).is_dir():
        parser.error(f"argument --load_features: no such folder: {args.load_features}")
    if args.pretrained_weights is not None and not Path(args.pretrained_weights).is_file():
        parser.error(f"argument --pretrained_weights: no such file: {args.pretrained_weights}")
    _check_device(parser, args.device)
    return args
