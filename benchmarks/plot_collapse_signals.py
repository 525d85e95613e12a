"""The collapse signals of short real runs, healthy and collapsed: the picture of docs/blocks/losses.md.

Runs the pretraining program (``python -m cmd pretrain``, logging every step to ``steps.csv``) on the easy
synthetic data with a narrow ResNet-18 at 32 px, in three settings that differ only in the teacher:

- healthy: DINO's centering, teacher temperature 0.04, BatchNorm in the heads;
- uniform collapse: teacher temperature 1.0 (the teacher's distributions are flat from the start);
- one-hot collapse: no centering (center momentum 1: the center stays 0) and no BatchNorm, teacher
  temperature 0.01, lr 10x: the sharp, uncentred teacher sends every image to a few prototypes;

and plots, per step, the teacher's per-sample entropy H(P_t) and batch-mean entropy H(mean P_t)
against log K. About a minute on 2 CPU cores::

    python benchmarks/plot_collapse_signals.py --out docs/assets/collapse_signals.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import cmd  # noqa: E402
from cmd.losses.cmd import UNIFORM_TOLERANCE  # noqa: E402

COMMON = ["--arch", "resnet18", "--synthetic_difficulty", "easy", "--synthetic_image_size", "32",
          "--global_size", "32", "--local_size", "16", "--local_crops_number", "4", "--out_dim", "128",
          "--freeze_last_layer", "0", "--loss", "dino", "--lr", "4e-3", "--no_knn", "--no_progress",
          "--num_workers", "0", "--log_every", "1", "--logger", "csv", "--seed", "0"]
SETTINGS = {
    "healthy": ["--head_bn", "true", "--teacher_temp", "0.04", "--warmup_teacher_temp", "0.04"],
    "uniform collapse": ["--head_bn", "true", "--teacher_temp", "1.0", "--warmup_teacher_temp", "1.0"],
    "one-hot collapse": ["--teacher_temp", "0.01", "--warmup_teacher_temp", "0.01", "--center_momentum", "1.0",
                         "--lr", "4e-2"],
}


def _read_steps(path: Path) -> dict[str, list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in ("step", "teacher_entropy", "teacher_batch_entropy")}


def _pretrain(argv: list[str]) -> list[str]:
    """Run ``python -m cmd pretrain ARGV`` (this checkout's ``cmd``); the collapse kinds its epochs diagnosed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(cmd.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "cmd", "pretrain", *argv], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"cmd-fgvc pretrain {' '.join(argv)}: exit status {proc.returncode}")
    out_dir = Path(argv[argv.index("--output_dir") + 1])
    epochs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(e["collapse"] for e in epochs if e.get("collapse")))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run (12 steps each)")
    parser.add_argument("--out", default="docs/assets/collapse_signals.png", help="the PNG written")
    opts = parser.parse_args(argv)
    log_k = math.log(128)
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(4.2 * len(SETTINGS), 3.4), sharey=True)
    with tempfile.TemporaryDirectory() as work:
        for ax, (name, extra) in zip(axes, SETTINGS.items()):
            out_dir = Path(work) / name.replace(" ", "_")
            collapses = _pretrain([*COMMON, *extra, "--epochs", str(opts.epochs), "--output_dir", str(out_dir)])
            steps = _read_steps(out_dir / "steps.csv")
            ax.plot(steps["step"], steps["teacher_entropy"], label="H(P_t): per-sample")
            ax.plot(steps["step"], steps["teacher_batch_entropy"], label="H(mean P_t): batch-mean")
            ax.axhline(log_k, color="gray", linestyle="--", label="log K")
            ax.axhline((1 - UNIFORM_TOLERANCE) * log_k, color="gray", linestyle=":", linewidth=0.8)
            ax.axhline(0.1 * log_k, color="gray", linestyle=":", linewidth=0.8)
            diagnosed = ", ".join(collapses) or "none"
            ax.set_title(f"{name}\n(diagnosed: {diagnosed})", fontsize=10)
            ax.set_xlabel("step")
            print(f"{name}: last H(P_t) {steps['teacher_entropy'][-1]:.2f}, "
                  f"H(mean P_t) {steps['teacher_batch_entropy'][-1]:.2f}, log K {log_k:.2f}, diagnosed {diagnosed}")
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=8, loc="center right")
    fig.suptitle("teacher entropies per step (dotted: the thresholds of cmd.diagnose_collapse)", fontsize=10)
    fig.tight_layout()
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"written to {out}")
    return out


if __name__ == "__main__":
    main()
