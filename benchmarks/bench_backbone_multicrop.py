"""Benchmark `Backbone.forward_multicrop` against a naive per-crop loop (forward, no grad).

Multi-crop input: 2 global crops (224 px) and 8 local crops (96 px) of a batch of B images. The
multi-crop path runs one forward per resolution group (2 passes); the naive loop runs one per crop
(10 passes). The two contenders alternate inside each repeat; medians and their ratio are reported.

Usage:
    python benchmarks/bench_backbone_multicrop.py --batch 4 --repeats 5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

from cmd.backbones import create_backbone

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "bench_backbone_multicrop.json"
)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, batch: int, repeats: int, warmup: int, n_global: int, n_local: int) -> dict:
    torch.manual_seed(0)
    backbone = create_backbone(name, pretrained=False).eval()
    crops = [torch.randn(batch, 3, 224, 224) for _ in range(n_global)]
    crops += [torch.randn(batch, 3, 96, 96) for _ in range(n_local)]

    def multicrop() -> None:
        backbone.forward_multicrop(crops)

    def per_crop_loop() -> None:
        for crop in crops:
            backbone(crop)

    times: dict[str, list[float]] = {"forward_multicrop": [], "per_crop_loop": []}
    with torch.no_grad():
        for _ in range(warmup):
            multicrop()
            per_crop_loop()
        for r in tqdm(range(repeats), desc=name, leave=False):
            order = [("forward_multicrop", multicrop), ("per_crop_loop", per_crop_loop)]
            if r % 2:  # alternate which contender goes first
                order.reverse()
            for key, fn in order:
                times[key].append(_time(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": backbone.name,
        "batch": batch,
        "crops": f"{n_global}x224 + {n_local}x96",
        "median_s": med,
        "all_s": times,
        "speedup_multicrop": med["per_crop_loop"] / med["forward_multicrop"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["swin_tiny", "vit_small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n-global", type=int, default=2)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = [
        bench_model(m, args.batch, args.repeats, args.warmup, args.n_global, args.n_local)
        for m in args.models
    ]
    header = f"{'model':<32} {'crops':<16} {'B':>3} {'multicrop (s)':>14} {'per-crop (s)':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['model']:<32} {r['crops']:<16} {r['batch']:>3} {r['median_s']['forward_multicrop']:>14.3f} "
            f"{r['median_s']['per_crop_loop']:>13.3f} {r['speedup_multicrop']:>5.2f}x"
        )
    payload = {
        "benchmark": "backbone_multicrop",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "repeats": args.repeats,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
