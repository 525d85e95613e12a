"""Where a trained MIL pooling puts its weight: the mean weight map over a test split, against the part.

`compare_presets.py` reports the mass of the MIL weights on the synthetic part (`cmd.part_weight_mass`)
and says whether it beats the uniform share; this script says where the rest goes. For each finished
run (a folder of ``cmd-fgvc pretrain`` with its ``checkpoint.pth``, on synthetic data), over the test
split it reports:

- the **mean weight map**: the teacher's MIL weights [N] averaged over the test images, laid out on
  the token grid, times N (1 everywhere = uniform; a content-driven pooling that follows a part placed
  at random averages out near 1, a pooling that reads a fixed position shows a peak there);
- **top position mass**: the largest entry of the mean map over N, the share of the mass that one
  *fixed* grid position takes on average (uniform: 1 / N);
- **part mass** and the **uniform share** (as `compare_presets.py`: `cmd.part_weight_mass` of the
  weights and of uniform weights);
- **corr with the part**: the Pearson correlation, per image, of the weights with the part's token
  mask (`cmd.eval.localisation.part_token_mask`), averaged over the images with a part that covers some but not all
  tokens (0: the weights ignore where the part is);
- the weights' **normalised entropy** (their entropy over log N; 1 = uniform).

Runs are ``NAME=DIR`` (``DIR`` may be a pattern, as in `collapse_calibration.py`). Prints a table and
the maps, writes JSON::

    python benchmarks/mil_weight_map.py --runs 'medium-scratch=WORK/scratch/medium/cmd_seed*' \\
        'medium-stage1=WORK/from_stage1/medium/cmd_seed*' --json benchmarks/results/mil_weight_map.json

The presets ``dino`` and ``esvit`` train no MIL pooling (their checkpoints hold none): their runs are
refused, since a freshly initialised pooling would say nothing about them. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from cmd.checkpoint import read_checkpoint
from cmd.eval.localisation import part_token_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_presets  # noqa: E402
from run_specs import expand_all  # noqa: E402


def weight_map_stats(weights: torch.Tensor, part_tokens: torch.Tensor, grid: tuple[int, int]) -> dict:
    """The statistics of the module docstring from the weights of a split.

    Args:
        weights: [B, N] MIL weights (rows summing to 1), N = h * w.
        part_tokens: [B, N] bool, the tokens that overlap the part (`cmd.eval.localisation.part_token_mask`).
        grid: (h, w).

    Returns:
        ``mean_map`` ([h][w] list, times N), ``top_position_mass``, ``uniform_share`` (1 / N),
        ``part_mass``, ``uniform_part_mass``, ``part_correlation`` (None when no image has a part
        that covers some but not all tokens), ``entropy_ratio``.

    Example:
        >>> w = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
        >>> parts = torch.tensor([[False, True, False, False], [False, False, True, False]])
        >>> s = weight_map_stats(w, parts, (2, 2))
        >>> round(s["top_position_mass"], 3), round(s["part_mass"], 3), s["part_correlation"] < 0
        (0.7, 0.1, True)
    """
    if weights.ndim != 2 or weights.shape != part_tokens.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and part_tokens {tuple(part_tokens.shape)} must both be [B, N]")
    h, w = grid
    n = weights.shape[1]
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} tokens, the weights {n}")
    weights = weights.double()
    parts = part_tokens.to(torch.float64)
    mean = weights.mean(0)
    centred_w = weights - weights.mean(1, keepdim=True)
    centred_p = parts - parts.mean(1, keepdim=True)
    denominator = centred_w.norm(dim=1) * centred_p.norm(dim=1)
    usable = denominator > 0  # the part covers some but not all tokens, and the weights are not constant
    correlation = (centred_w * centred_p).sum(1)[usable] / denominator[usable]
    entropy = -(weights * weights.clamp_min(1e-300).log()).sum(1)
    return {
        "mean_map": (mean * n).view(h, w).tolist(),
        "top_position_mass": float(mean.max()),
        "uniform_share": 1.0 / n,
        "part_mass": float((weights * parts).sum(1).mean()),
        "uniform_part_mass": float(parts.mean(1).mean()),
        "part_correlation": float(correlation.mean()) if len(correlation) else None,
        "entropy_ratio": float(entropy.mean() / math.log(n)) if n > 1 else 1.0,
    }


def run_stats(folder: Path) -> dict:
    """`weight_map_stats` of a finished run's teacher over its synthetic test split."""
    checkpoint = read_checkpoint(folder / "checkpoint.pth")
    args = SimpleNamespace(**checkpoint["args"])
    if args.dataset != "synthetic":
        raise ValueError(f"{folder}: the part is known only on synthetic data, this run used --dataset {args.dataset}")
    if not any(k.startswith("head.pooling.") for k in checkpoint["teacher"]):
        raise ValueError(f"{folder}: the run trained no MIL pooling (--loss {args.loss}): nothing to map")
    net = compare_presets._teacher(args, checkpoint["teacher"])
    weights, masks, grid = compare_presets.mil_weights_on_test_split(net, args)
    return {"arch": args.arch, "loss": args.loss, "mil_pooling": getattr(args, "mil_pooling", None),
            "grid": list(grid), **weight_map_stats(weights.float(), part_token_mask(masks, grid), grid)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                        help="finished runs with a trained MIL pooling (DIR may be a pattern)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/mil_weight_map.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        named, _ = expand_all(args.runs, required="checkpoint.pth")
        rows = [{"run": name, "folder": str(folder), **run_stats(folder)} for name, folder in named]
    except ValueError as err:
        parser.error(str(err))
    print("| run | grid | top position mass (uniform) | part mass (uniform) | corr with the part | entropy / log N |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        corr = "-" if r["part_correlation"] is None else f"{r['part_correlation']:+.3f}"
        print(f"| {r['run']} | {r['grid'][0]} x {r['grid'][1]} | {r['top_position_mass']:.3f} ({r['uniform_share']:.3f}) | "
              f"{r['part_mass']:.3f} ({r['uniform_part_mass']:.3f}) | {corr} | {r['entropy_ratio']:.3f} |")
    for r in rows:
        print(f"\n{r['run']}: mean weight map x N (1 = uniform)")
        for line in r["mean_map"]:
            print("  " + " ".join(f"{v:5.2f}" for v in line))
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": command, "torch": torch.__version__, "runs": rows}, indent=1) + "\n")
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
