"""CMD against the DINO and EsViT presets on the synthetic fine-grained data, at the same budget.

For each preset, ``examples/pretrain.py`` trains from the same seed with the same data, crops,
backbone, heads and schedule; then the teacher is scored by

- k-NN top-1 (%) of its pooled features (train split as memory, test split as queries), and
- the multi-instance weight mass on the discriminative part of the synthetic images (test split),
  against the uniform baseline (the fraction of tokens that overlap the part). Under the "dino" and
  "esvit" presets the MIL pooling receives no gradient (no term uses it), so its mass shows what an
  untrained pooling gives; under "cmd" the inter-level term trains it.

Prints a table and writes JSON. This is a benchmark, not a test: report whichever way it comes out.

    python benchmarks/compare_presets.py --epochs 10 --out benchmarks/results/compare_presets.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import cmd

REPO = Path(__file__).resolve().parents[1]


def _load_pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_example", REPO / "examples" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def part_mass(net: cmd.CMDNetwork, args: argparse.Namespace) -> tuple[float, float]:
    """Mean MIL weight mass on the part and the uniform baseline, over the test split (native size)."""
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(cmd.IMAGENET_MEAN, cmd.IMAGENET_STD)])
    data = cmd.SyntheticFineGrained(
        n_classes=args.synthetic_classes, n_per_class=args.synthetic_per_class,
        image_size=args.synthetic_image_size, split="test", seed=args.seed, transform=to_tensor,
        return_part_mask=True,
    )
    net.eval()
    masses, uniform = [], []
    for images, _labels, masks in DataLoader(data, batch_size=64):
        feats = net.backbone(images)
        out = net.head(feats.tokens, feats.pooled)
        masses.append(cmd.part_weight_mass(out.mil_weights, masks, feats.grid))
        n_tokens = feats.grid[0] * feats.grid[1]
        uniform.append(cmd.part_weight_mass(torch.full((len(images), n_tokens), 1.0 / n_tokens), masks, feats.grid))
    return float(torch.cat(masses).mean()), float(torch.cat(uniform).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["dino", "esvit", "cmd"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="outputs/compare_presets")
    parser.add_argument("--out", default="benchmarks/results/compare_presets.json")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further options passed to examples/pretrain.py (after --extra)")
    opts = parser.parse_args(argv)
    pretrain = _load_pretrain()
    rows = []
    for preset in opts.presets:
        out_dir = Path(opts.work_dir) / preset
        pre_argv = ["--loss", preset, "--epochs", str(opts.epochs), "--seed", str(opts.seed),
                    "--output_dir", str(out_dir), "--no_progress", *opts.extra]
        t0 = time.perf_counter()
        result = pretrain.main(pre_argv)
        elapsed = time.perf_counter() - t0
        args = pretrain.parse_args(pre_argv)
        net = pretrain.build_network(args)
        state = torch.load(out_dir / "checkpoint.pth", map_location="cpu", weights_only=True)["teacher"]
        # "dino" / "esvit" consume no MIL weights: their networks were built without a pooling, and
        # an untrained (freshly initialised) one measures the part mass here
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("head.pooling.") for k in missing):
            raise RuntimeError(f"checkpoint does not fit the network: missing {missing}, unexpected {unexpected}")
        mass, uniform = part_mass(net, args)
        rows.append({"preset": preset, "knn_before": result["knn"].get("before"), "knn_after": result["knn"]["after"],
                     "part_mass": mass, "uniform_mass": uniform, "train_time_s": elapsed})
    print(f"\nsynthetic fine-grained data, {opts.epochs} epochs, seed {opts.seed}")
    print(f"{'preset':>7} | {'k-NN before':>11} | {'k-NN after':>10} | {'part mass':>9} | {'uniform':>7} | {'time (s)':>8}")
    for r in rows:
        print(f"{r['preset']:>7} | {r['knn_before']:>11.2f} | {r['knn_after']:>10.2f} | {r['part_mass']:>9.4f} | "
              f"{r['uniform_mass']:>7.4f} | {r['train_time_s']:>8.1f}")
    payload = {"rows": rows, "epochs": opts.epochs, "seed": opts.seed, "extra": opts.extra,
               "torch": torch.__version__, "cmd": cmd.__version__, "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads()}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(payload, indent=2))
    print(f"written to {opts.out}")
    return payload


if __name__ == "__main__":
    main()
