"""Evaluate a frozen (teacher) backbone: k-NN, linear probe or retrieval, as in the paper's protocols.

Examples::

    # k-NN of a CMD checkpoint's teacher on CUB-200-2011 (k = 10, 20, 100, 200; k = 20 the headline)
    cmd-fgvc evaluate knn --pretrained_weights out/cub_cmd/checkpoint.pth \\
        --checkpoint_key teacher --arch swin_tiny --dataset cub --data_path /data/CUB_200_2011

    # linear probe on the last 4 blocks, 8 GPUs
    torchrun --nproc_per_node 8 -m cmd evaluate linear --pretrained_weights ... --arch swin_tiny \\
        --dataset cub --data_path /data/CUB_200_2011 --n_last_blocks 4 --epochs 100

    # retrieval (query: every 9th test image; gallery: train + remaining test)
    cmd-fgvc evaluate retrieval --pretrained_weights ... --arch swin_tiny --dataset cub ...

With no ``--pretrained_weights`` the randomly initialised backbone is evaluated (a baseline). The
default dataset is the synthetic fine-grained one at 64 px, so ``cmd-fgvc evaluate knn``
runs anywhere in seconds. Results are printed as a table and written to ``output_dir/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

import cmd
from cmd import distributed as dist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmd-fgvc evaluate", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("protocol", choices=["knn", "linear", "retrieval"])
    p.add_argument("--pretrained_weights", type=str, default=None, help="checkpoint (cmd, DINO, EsViT or timm)")
    p.add_argument("--checkpoint_key", type=str, default="teacher")
    p.add_argument("--trust_pickle", action="store_true", help="allow old pickled checkpoints (unsafe)")
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--backbone_kwargs", type=json.loads, default=None, help="JSON dict of timm kwargs")
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "cub", "cars", "aircraft", "imagefolder"])
    p.add_argument("--data_path", type=str, default=None)
    p.add_argument("--synthetic_classes", type=int, default=10)
    p.add_argument("--synthetic_per_class", type=int, default=40)
    p.add_argument("--synthetic_image_size", type=int, default=64)
    p.add_argument("--image_size", type=int, default=None, help="eval crop (224 for real data; default 64 synthetic)")
    p.add_argument("--batch_size_per_gpu", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", type=str, default="outputs/evaluate")
    p.add_argument("--dump_features", type=str, default=None, help="save extracted features to this folder")
    p.add_argument("--load_features", type=str, default=None, help="reuse features saved by --dump_features")
    p.add_argument("--no_progress", action="store_true")
    g = p.add_argument_group("k-NN")
    g.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    g.add_argument("--temperature", type=float, default=0.07)
    g.add_argument("--label_fraction", type=float, default=None, help="keep a class-balanced fraction of train labels")
    g = p.add_argument_group("linear probe")
    g.add_argument("--n_last_blocks", type=int, default=4)
    g.add_argument("--avgpool_patchtokens", action="store_true")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--lr", type=float, default=None, help="default 1e-3 * total batch / 256")
    g.add_argument("--lrs", type=float, nargs="+", default=None, help="one head per learning rate, best reported")
    g.add_argument("--num_labels", type=int, default=None, help="number of classes (inferred from the data)")
    g.add_argument("--cache_features", action="store_true", help="extract once without augmentation, train on it")
    g = p.add_argument_group("retrieval")
    g.add_argument("--every", type=int, default=9, help="query = test index % every == 0")
    g.add_argument("--map_at", type=int, default=100)
    return p


def _dataset(args, split: str, transform):
    if args.dataset == "synthetic":
        return cmd.SyntheticFineGrained(
            n_classes=args.synthetic_classes, n_per_class=args.synthetic_per_class,
            image_size=args.synthetic_image_size, split=split, seed=args.seed, transform=transform,
        )
    if args.data_path is None:
        raise SystemExit(f"--data_path is required for --dataset {args.dataset}")
    return cmd.build_dataset(args.dataset, args.data_path, split, transform)


def _loader(data, args, *, shuffle: bool) -> DataLoader:
    sampler = DistributedSampler(data, shuffle=shuffle, seed=args.seed) if dist.is_dist() else None
    return DataLoader(
        data, batch_size=args.batch_size_per_gpu, sampler=sampler, shuffle=shuffle and sampler is None,
        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
    )


def build_backbone(args) -> torch.nn.Module:
    # through create_backbone: EsViT/CMD and DINO checkpoints get their reference numerics (see the report)
    weights = {"checkpoint": args.pretrained_weights, "checkpoint_key": args.checkpoint_key,
               "trust_pickle": args.trust_pickle} if args.pretrained_weights else {}
    backbone = cmd.create_backbone(args.arch, pretrained=False, **weights, **(args.backbone_kwargs or {}))
    if args.pretrained_weights:
        if dist.is_main_process():
            print(f"loaded {args.pretrained_weights} [{args.checkpoint_key}]: {backbone.load_report.summary()}")
    elif dist.is_main_process():
        print("no --pretrained_weights: evaluating the randomly initialised backbone")
    return backbone.eval()


def features(args, backbone, device) -> dict[str, torch.Tensor]:
    """Train and test features ([N, D], L2-normalised) and labels, extracted or loaded."""
    if args.load_features:
        folder = Path(args.load_features)
        return {k: torch.load(folder / f"{k}.pt", weights_only=True) for k in ("train_x", "train_y", "test_x", "test_y")}
    transform = cmd.eval_transform(args.image_size)
    out = {}
    for split in ("train", "test"):
        loader = _loader(_dataset(args, split, transform), args, shuffle=False)
        x, y = cmd.extract_features(backbone, loader, device=device, progress=not args.no_progress)
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    if args.dump_features and dist.is_main_process():
        folder = Path(args.dump_features)
        folder.mkdir(parents=True, exist_ok=True)
        for k, v in out.items():
            torch.save(v.cpu(), folder / f"{k}.pt")
        print(f"features saved to {folder}")
    return out


def run_knn(args, backbone, device) -> dict:
    f = features(args, backbone, device)
    knn = cmd.KNNClassifier(k=tuple(args.nb_knn), temperature=args.temperature, num_classes=args.num_labels)
    knn.fit(f["train_x"], f["train_y"], label_fraction=args.label_fraction, seed=args.seed)
    return {f"k={k}": v for k, v in knn.evaluate(f["test_x"], f["test_y"]).items()}


def run_retrieval(args, backbone, device) -> dict:
    f = features(args, backbone, device)
    q, ql, g, gl = cmd.fine_grained_retrieval_split(f["train_x"], f["train_y"], f["test_x"], f["test_y"], every=args.every)
    return cmd.retrieval_metrics(q, ql, g, gl, ranks=(1, 5), map_at=args.map_at)


def run_linear(args, backbone, device) -> dict:
    size = args.image_size
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cmd.IMAGENET_MEAN, cmd.IMAGENET_STD)]
    train_tf = cmd.eval_transform(size) if args.cache_features else v2.Compose(
        [v2.ToImage(), v2.RGB(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *norm]
    )
    train_loader = _loader(_dataset(args, "train", train_tf), args, shuffle=True)
    val_loader = _loader(_dataset(args, "test", cmd.eval_transform(size)), args, shuffle=False)
    results = cmd.train_linear_probe(
        backbone, train_loader, val_loader, num_classes=args.num_labels, n_last_blocks=args.n_last_blocks,
        avgpool=args.avgpool_patchtokens, epochs=args.epochs, lr=args.lr, lrs=args.lrs,
        cache_features=args.cache_features, label_fraction=args.label_fraction, seed=args.seed,
        device=device, progress=not args.no_progress,
    )
    probe = results.pop("probe", None)
    if probe is not None and dist.is_main_process():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        torch.save(probe.state_dict(), Path(args.output_dir) / "linear_probe.pth")
    return results


def _table(results: dict) -> str:
    rows = []
    for key, value in results.items():
        if isinstance(value, dict):
            rows.append(f"{key:>12} " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()))
        elif isinstance(value, float):
            rows.append(f"{key:>12} {value:.2f}")
        else:
            rows.append(f"{key:>12} {value}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.image_size is None:
        args.image_size = args.synthetic_image_size if args.dataset == "synthetic" else 224
    dist.init_distributed_from_env()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and dist.is_dist():
        device = torch.device("cuda", torch.cuda.current_device())
    backbone = build_backbone(args).to(device)
    run = {"knn": run_knn, "linear": run_linear, "retrieval": run_retrieval}[args.protocol]
    results = run(args, backbone, device)
    if dist.is_main_process():
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        payload = {"protocol": args.protocol, "args": vars(args), "results": results}
        (out / "results.json").write_text(json.dumps(payload, indent=2, default=str))
        print(f"\n{args.protocol} results ({args.arch}, {args.dataset}):\n{_table(results)}")
        print(f"written to {out / 'results.json'}")
    return results


def run(argv: list[str] | None = None) -> int:
    """The ``cmd-fgvc evaluate`` command: run `main`, return the process exit status."""
    try:
        main(argv)
    finally:
        if dist.is_dist():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run())
