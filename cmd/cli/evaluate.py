"""Evaluate a frozen (teacher) backbone: k-NN, linear probe or retrieval, as in the paper's protocols.

Examples::

    # k-NN of a CMD checkpoint's teacher on CUB-200-2011 (k = 10, 20, 100, 200; k = 20 the headline)
    # (the architecture, backbone settings and image size come from the checkpoint's training args)
    cmd-fgvc evaluate knn --pretrained_weights out/cub_cmd/checkpoint.pth \\
        --dataset cub --data_path /data/CUB_200_2011

    # linear probe on the last 4 blocks, 8 GPUs: the lr is picked on 10 % of the training split
    torchrun --nproc_per_node 8 -m cmd evaluate linear --pretrained_weights ... \\
        --dataset cub --data_path /data/CUB_200_2011 --n_last_blocks 4 --epochs 100

    # the official eval_linear.py protocol (one lr, 1e-3 x batch / 256; best test top-1 over the epochs)
    cmd-fgvc evaluate linear --official --pretrained_weights ... --dataset cub ...

    # a checkpoint kept every N epochs by `cmd-fgvc pretrain --saveckp_freq N` (as the paper's 0270)
    cmd-fgvc evaluate knn --pretrained_weights out/cub_cmd/checkpoint0270.pth --dataset cub ...

    # retrieval (query: every 9th test image; gallery: train + remaining test)
    cmd-fgvc evaluate retrieval --pretrained_weights ... --dataset cub ...

With no ``--pretrained_weights`` the randomly initialised backbone is evaluated (a baseline). The
default dataset is the synthetic fine-grained one (the demo's, 32 px), so ``cmd-fgvc evaluate knn``
runs anywhere in seconds. Results are printed as a table and written to ``output_dir/results.json``.
"""


from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

import cmd
from cmd import distributed as dist
from cmd.cli.common import build_data, cli_message, resolve_device, rounded, run_command
from cmd.cli.options import build_evaluate_parser, parse_evaluate_args

build_parser = build_evaluate_parser
parse_args = parse_evaluate_args

_DEFAULT_ARCH = "vit_tiny"


def _dataset(args, split: str, transform):
    return build_data(args, split, transform, command="evaluate")


def _loader(data, args, *, shuffle: bool) -> DataLoader:
    sampler = DistributedSampler(data, shuffle=shuffle, seed=args.seed) if dist.is_dist() else None
    return DataLoader(
        data, batch_size=args.batch_size_per_gpu, sampler=sampler, shuffle=shuffle and sampler is None,
        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
    )


# ------------------------------------------------------------------------ what the checkpoint knows


def read_weights(args: argparse.Namespace) -> Any:
    """The ``--pretrained_weights`` file's content (read once, safely), or None without the option."""
    if not args.pretrained_weights:
        return None
    try:
        return cmd.backbones.read_checkpoint_file(args.pretrained_weights, trust_pickle=args.trust_pickle)
    except (OSError, RuntimeError, ValueError) as err:
        hint = "" if args.trust_pickle or "pickle" not in str(err) else " (--trust_pickle reads it, for files you trust)"
        raise SystemExit(f"--pretrained_weights: {cli_message(err)}{hint}") from err


def check_output_dir(path: str | os.PathLike, option: str = "--output_dir") -> Path:
    """Create the folder ``path`` if needed and prove that a file can be written in it.

    Run before anything is computed, so that an unusable folder (a file, a read-only folder, a
    parent that is a file) costs nothing; the probe file is removed.

    Raises:
        SystemExit: one line naming ``option`` and the folder.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"{option} {folder}: is a file, not a folder; pass a folder for the results")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test_", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise SystemExit(f"{option} {folder}: cannot write there ({err.strerror or err}); pass a writable folder") \
            from err
    return folder


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"cannot write {path}: {err.strerror or err}") from err


def apply_checkpoint_args(args: argparse.Namespace, content: Any) -> dict[str, Any]:
    """Fill ``--arch``, ``--backbone_kwargs`` and ``--image_size`` left unset from the checkpoint.

    A cmd-fgvc training checkpoint stores its training arguments (``args``): the architecture, the
    timm kwargs and the k-NN image size (``--eval_size``, else ``--global_size``) are taken from
    them; values given on the command line win (``--backbone_kwargs`` is only taken with the
    checkpoint's own ``--arch``). Without stored arguments the defaults are ``vit_tiny``, ``{}`` and
    ``--synthetic_image_size`` (synthetic data) or 224.

    Returns:
        The values taken from the checkpoint, by option name (empty when none were).
    """
    stored = content.get("args") if isinstance(content, Mapping) else None
    stored = stored if isinstance(stored, Mapping) else {}
    taken: dict[str, Any] = {}
    if args.arch is None:
        if stored.get("arch"):
            args.arch = taken["arch"] = stored["arch"]
        else:
            args.arch = _DEFAULT_ARCH
    if args.backbone_kwargs is None:
        kwargs = stored.get("backbone_kwargs")
        if isinstance(kwargs, Mapping) and stored.get("arch") == args.arch:
            args.backbone_kwargs = taken["backbone_kwargs"] = dict(kwargs)
        else:
            args.backbone_kwargs = {}
    if args.image_size is None:
        size = stored.get("eval_size") or stored.get("global_size")
        if isinstance(size, int) and size > 0:
            args.image_size = taken["image_size"] = size
        else:
            args.image_size = {"synthetic": args.synthetic_image_size, "digits": 32}.get(args.dataset, 224)
    return taken


def _flags(values: Mapping[str, Any]) -> str:
    return " ".join(f"--{k} {json.dumps(v) if isinstance(v, dict) else v}" for k, v in values.items())


def build_backbone(args: argparse.Namespace, content: Any = None) -> torch.nn.Module:
    """The backbone to evaluate: ``--arch`` with ``--pretrained_weights`` loaded (exactly), in eval mode.

    ``content``: the checkpoint already read by `read_weights` (read here when None). Settings left
    unset are taken from the checkpoint's training arguments (`apply_checkpoint_args`).

    Raises:
        SystemExit: a checkpoint that cannot be read or does not fit; one line naming the flags.
    """
    if content is None:
        content = read_weights(args)
    taken = apply_checkpoint_args(args, content)
    verbose = dist.is_main_process()
    if taken and verbose:
        print(f"from the checkpoint's training arguments: {_flags(taken)} (command-line values override these)")
    try:
        # through create_backbone: EsViT/CMD and DINO checkpoints get their reference numerics
        weights = {"checkpoint": content, "checkpoint_key": args.checkpoint_key} if content is not None else {}
        backbone = cmd.create_backbone(args.arch, pretrained=False, **weights, **args.backbone_kwargs)
    except (ValueError, RuntimeError, KeyError) as err:
        shown = _flags({"arch": args.arch, "backbone_kwargs": args.backbone_kwargs})
        if content is None:
            raise SystemExit(f"cannot create the backbone {shown}: {cli_message(err)}") from err
        raise SystemExit(
            f"--pretrained_weights {args.pretrained_weights} [--checkpoint_key {args.checkpoint_key}] does not fit "
            f"{shown}: {cli_message(err)}. Pass the --arch and --backbone_kwargs it was trained with"
        ) from err
    if content is not None:
        if verbose:
            summary = backbone.load_report.summary().replace("; pass numerics= to override", "")
            print(f"loaded {args.pretrained_weights} [{args.checkpoint_key}]: {summary}")
    elif verbose:
        print("no --pretrained_weights: evaluating the randomly initialised backbone")
    return backbone.eval()


def checkpoint_provenance(args: argparse.Namespace, content: Any, backbone: Any) -> dict | None:
    """Path, key, epoch / step (training checkpoints) and numerics of the weights evaluated."""
    if not args.pretrained_weights:
        return None
    info: dict[str, Any] = {"path": str(Path(args.pretrained_weights).resolve()), "key": args.checkpoint_key}
    if isinstance(content, Mapping):
        for key in ("epoch", "step"):
            if isinstance(content.get(key), int | float):
                info[key] = content[key]
    report = getattr(backbone, "load_report", None)
    if report is not None:
        info["format"] = report.source_format
        info["numerics"] = backbone.numerics
    return info


# ------------------------------------------------------------------------------------------ features


def _dataset_info(args: argparse.Namespace) -> dict[str, Any]:
    if args.dataset == "synthetic":
        return {"name": "synthetic", "classes": args.synthetic_classes, "per_class": args.synthetic_per_class,
                "image_size": args.synthetic_image_size, "seed": args.seed}
    if args.dataset == "digits":
        return {"name": "digits", "image_size": 32, "seed": args.seed}
    return {"name": args.dataset, "path": str(Path(args.data_path).resolve())}


def features(args, backbone, device, *, describe: dict | None = None) -> dict[str, torch.Tensor]:
    """Train and test features ([N, D], L2-normalised) and labels, extracted or loaded.

    ``describe`` (a dict) receives where the features come from: the dataset and its sizes, or the
    description stored next to features saved by ``--dump_features``.
    """
    describe = {} if describe is None else describe
    if args.load_features:
        folder = Path(args.load_features)
        try:
            out = {k: torch.load(folder / f"{k}.pt", weights_only=True) for k in ("train_x", "train_y", "test_x", "test_y")}
        except FileNotFoundError as err:
            raise SystemExit(f"--load_features {folder}: {err.filename} is missing (written by --dump_features)") from err
        source = folder / "features.json"
        saved = json.loads(source.read_text()) if source.is_file() else {}
        describe["features"] = {"loaded_from": str(folder.resolve()), **saved}
        if not saved:
            describe["features"]["source"] = "unknown (no features.json: dumped by an older version)"
        describe["dataset"] = {**saved.get("dataset", {"name": "unknown"}),
                               "train": int(out["train_x"].shape[0]), "test": int(out["test_x"].shape[0])}
        return out
    transform = cmd.eval_transform(args.image_size)
    out = {}
    for split in ("train", "test"):
        loader = _loader(_dataset(args, split, transform), args, shuffle=False)
        x, y = cmd.extract_features(backbone, loader, device=device, progress=not args.no_progress)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    describe["dataset"] = {**_dataset_info(args), "train": int(out["train_x"].shape[0]),
                           "test": int(out["test_x"].shape[0])}
    describe["features"] = {"extracted": True, "image_size": args.image_size}
    if args.dump_features and dist.is_main_process():
        folder = Path(args.dump_features)
        folder.mkdir(parents=True, exist_ok=True)
        for k, v in out.items():
            torch.save(v.cpu(), folder / f"{k}.pt")
        source = {"dataset": _dataset_info(args), "arch": args.arch, "backbone_kwargs": args.backbone_kwargs,
                  "image_size": args.image_size, "checkpoint": describe.get("checkpoint")}
        (folder / "features.json").write_text(json.dumps(source, indent=2, default=str))
        print(f"features saved to {folder}")
    return out


# ----------------------------------------------------------------------------------------- protocols


def run_knn(args, backbone, device, describe: dict | None = None) -> dict:
    f = features(args, backbone, device, describe=describe)
    knn = cmd.KNNClassifier(k=tuple(args.nb_knn), temperature=args.temperature, num_classes=args.num_labels)
    knn.fit(f["train_x"], f["train_y"], label_fraction=args.label_fraction, seed=args.seed)
    return rounded({f"k={k}": v for k, v in knn.evaluate(f["test_x"], f["test_y"]).items()})


def run_retrieval(args, backbone, device, describe: dict | None = None) -> dict:
    describe = {} if describe is None else describe
    f = features(args, backbone, device, describe=describe)
    q, ql, g, gl = cmd.fine_grained_retrieval_split(f["train_x"], f["train_y"], f["test_x"], f["test_y"], every=args.every)
    describe.setdefault("dataset", {}).update(queries=int(q.shape[0]), gallery=int(g.shape[0]))
    return rounded(cmd.retrieval_metrics(q, ql, g, gl, ranks=(1, 5), map_at=args.map_at))


def run_linear(args, backbone, device, describe: dict | None = None) -> dict:
    describe = {} if describe is None else describe
    if args.load_features:
        raise SystemExit("--load_features works with knn and retrieval; the linear probe runs the backbone")
    depth = getattr(backbone, "num_blocks", None)
    if isinstance(depth, int) and args.n_last_blocks > depth:
        raise SystemExit(f"--n_last_blocks {args.n_last_blocks}: the backbone ({args.arch}) has only {depth} "
                         f"block{'s' if depth > 1 else ''}; pass --n_last_blocks {depth} or fewer")
    official = bool(getattr(args, "official", False))
    lr = args.lr
    if official:
        given = [f"--{k}" for k in ("lr", "lrs") if getattr(args, k) is not None]
        given += ["--cache_features"] if args.cache_features else []
        if given:
            raise SystemExit(f"--official sets the lr (1e-3 x total batch / 256) and trains on augmented images: "
                             f"drop {', '.join(given)}")
        lr = 1e-3 * args.batch_size_per_gpu * dist.world_size() / 256
    size = args.image_size
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cmd.IMAGENET_MEAN, cmd.IMAGENET_STD)]
    train_tf = cmd.eval_transform(size) if args.cache_features else v2.Compose(
        [v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *norm]
    )
    train_data, test_data = _dataset(args, "train", train_tf), _dataset(args, "test", cmd.eval_transform(size))
    # several lrs: the held-out validation images are seen with the test transform, like the test images
    selecting = lr is None and (args.lrs is None or len(args.lrs) > 1)
    train_eval = _loader(_dataset(args, "train", cmd.eval_transform(size)), args, shuffle=False) \
        if selecting and not args.cache_features else None
    describe["dataset"] = {**_dataset_info(args), "train": len(train_data), "test": len(test_data)}
    results = cmd.train_linear_probe(
        backbone, _loader(train_data, args, shuffle=True), _loader(test_data, args, shuffle=False),
        num_classes=args.num_labels, n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool_patchtokens, epochs=args.epochs, lr=lr, lrs=args.lrs,
        cache_features=args.cache_features, label_fraction=args.label_fraction,
        val_fraction=getattr(args, "val_fraction", 0.1), train_eval_loader=train_eval, seed=args.seed,
        device=device, progress=not args.no_progress,
    )
    probe = results.pop("probe", None)
    if probe is not None and dist.is_main_process():
        path = Path(args.output_dir) / "linear_probe.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(probe.state_dict(), tmp)
        os.replace(tmp, path)
    per_lr = results.pop("per_lr", None)
    results["lr"] = float(f"{results['lr']:.4g}")
    if official:
        results["lr_selection"] = "official"
    if per_lr is not None:
        results["per_lr"] = {f"{float(rate):.4g}": metrics for rate, metrics in per_lr.items()}
    return rounded(results)


# ------------------------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 0.01 or value == 0 else f"{value:.3g}"
    return str(value)


_OFFICIAL_NOTE = "official eval_linear.py protocol: the epoch is picked on the test split"


def format_results(results: Mapping[str, Any]) -> str:
    """Results as an aligned text table: one row per k (k-NN) or per learning rate (linear probe)."""
    if "lr_selection" in results:
        return _format_linear(results)
    rows = {k: v for k, v in results.items() if isinstance(v, Mapping) and v}
    lines = []
    if rows:  # e.g. {"k=20": {"top1": .., "top5": ..}}
        columns = list(next(iter(rows.values())))
        lines.append(f"{'':>8}  " + "  ".join(f"{c:>10}" for c in columns))
        lines += [f"{key:>8}  " + "  ".join(f"{_fmt(v.get(c, '')):>10}" for c in columns) for key, v in rows.items()]
    scalars = {k: v for k, v in results.items() if not isinstance(v, Mapping)}
    if scalars:
        lines.append("  ".join(f"{k} {_fmt(v)}" for k, v in scalars.items()))
    return "\n".join(lines)


def _format_linear(results: Mapping[str, Any]) -> str:
    """The linear probe: the test accuracy, how its lr was chosen, the official number labelled, the lr table."""
    how = {
        "validation": f"lr {_fmt(results['lr'])} picked on a validation split of {results.get('num_val')} training "
                      "images" + (f", then retrained on all {results.get('num_train')}" if results.get("refit")
                                  else f", trained on the other {results.get('num_train')}"),
        "single": f"one lr, {_fmt(results['lr'])}, trained on {results.get('num_train')} images",
        "official": f"one lr, {_fmt(results['lr'])} (1e-3 x batch / 256), trained on {results.get('num_train')} images",
    }.get(results["lr_selection"], f"lr {_fmt(results['lr'])}")
    lines = [f"top1 {_fmt(results['top1'])}  top5 {_fmt(results['top5'])}  (test, after the last epoch; {how})"]
    if "best_test_top1_over_epochs" in results:
        lines.append(f"best_test_top1_over_epochs {_fmt(results['best_test_top1_over_epochs'])}  ({_OFFICIAL_NOTE})")
    shown = ("top1", "top5", "lr", "lr_selection", "per_lr", "refit", "best_test_top1_over_epochs", "num_val")
    rest = {k: v for k, v in results.items() if k not in shown and not isinstance(v, Mapping)}
    if rest:
        lines.append("  ".join(f"{k} {_fmt(v)}" for k, v in rest.items()))
    per_lr = results.get("per_lr")
    if per_lr:
        lines.append(f"\n{'lr':>10}  {'val_top1':>8}  {'val_top5':>8}")
        for rate, m in per_lr.items():
            mark = "  <- picked" if float(rate) == float(results["lr"]) else ""
            lines.append(f"{rate:>10}  {_fmt(m['val_top1']):>8}  {_fmt(m['val_top5']):>8}{mark}")
    return "\n".join(lines)


def provenance(args: argparse.Namespace, device: torch.device, describe: Mapping[str, Any]) -> dict[str, Any]:
    """Library version, date, device and what was evaluated (dataset and sizes, checkpoint, features)."""
    device_text = str(device)
    if device.type == "cuda":
        device_text += f" ({torch.cuda.get_device_name(device)})"
    return {
        "library": "cmd-fgvc",
        "version": cmd.__version__,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_text,
        "world_size": dist.world_size(),
        **describe,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_evaluate_args(argv)
    dist.init_distributed_from_env()
    if dist.is_main_process():  # before anything is computed: an unusable folder would lose the results
        check_output_dir(args.output_dir)
        if args.dump_features:
            check_output_dir(args.dump_features, "--dump_features")
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    describe: dict[str, Any] = {}
    if args.load_features:  # the features are what is evaluated: no backbone runs
        backbone = None
    else:
        content = read_weights(args)
        backbone = build_backbone(args, content).to(device)
        describe["checkpoint"] = checkpoint_provenance(args, content, backbone)
        del content
    protocol = {"knn": run_knn, "linear": run_linear, "retrieval": run_retrieval}[args.protocol]
    results = protocol(args, backbone, device, describe)
    if dist.is_main_process():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        info = provenance(args, device, describe)
        payload = {"protocol": args.protocol, "results": results, "provenance": info, "args": vars(args)}
        if args.protocol == "linear":
            payload["notes"] = _linear_notes(results)
        _write_atomic(out / "results.json", json.dumps(payload, indent=2, default=str))
        print(f"\n{args.protocol} results: {_header(args, info)}\n{format_results(results)}")
        print(f"written to {out / 'results.json'}")
    return results


def _linear_notes(results: Mapping[str, Any]) -> dict[str, str]:
    how = {"validation": "its lr picked on a validation split held out from the training split (per_lr: the "
                         "validation accuracy of each lr)",
           "single": "the one lr given", "official": "the official lr, 1e-3 x total batch / 256"}
    return {
        "top1": f"test accuracy after the last epoch of the head trained with {how.get(results['lr_selection'], '')}",
        "best_test_top1_over_epochs": f"the best test top-1 over the epochs: the {_OFFICIAL_NOTE} (not a "
                                      "held-out estimate)",
    }


def _header(args: argparse.Namespace, info: Mapping[str, Any]) -> str:
    data = info.get("dataset", {})
    sizes = ", ".join(f"{k} {data[k]}" for k in ("train", "test", "queries", "gallery") if k in data)
    features = info.get("features", {})
    if "loaded_from" in features:
        source = f"features from {features['loaded_from']}"
        if features.get("arch"):
            source += f" ({features['arch']} at {features.get('image_size')} px)"
    else:
        ckpt = info.get("checkpoint") or {}
        weights = ckpt.get("path", "random weights")
        if "epoch" in ckpt:
            weights += f" (epoch {ckpt['epoch']})"
        source = f"{args.arch} at {args.image_size} px, {weights}"
    return f"{source}; {data.get('name', args.dataset)} ({sizes}); {info['device']}"


def run(argv: list[str] | None = None) -> int:
    """The ``cmd-fgvc evaluate`` command: run `main`, return the process exit status."""
    return run_command(main, argv)


if __name__ == "__main__":
    sys.exit(run())
