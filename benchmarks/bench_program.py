"""Benchmark: ``cmd-fgvc pretrain`` against a bare loop of the same blocks, options and data.

What it measures, for each setting (``demo``: the program's defaults; ``mid``: ViT-S/16 at 96 / 48 px):

- **steady-state images/s** of the program (`cmd.cli.pretrain.main`, called in this process with
  ``--log_every 1``: its own ``images_per_s`` column of ``steps.csv``) and of a bare loop (the same
  library blocks built from the same parsed options, the same dataset, augmentation and DataLoader
  settings, and nothing else: no logging, checkpoints, finiteness guard, collapse watch or k-NN
  monitor), each step timed the same way (wall time from the end of one step to the end of the next,
  data loading included). Steady state: the median over the steps of every epoch after its first
  ``--settle`` steps. Both run for the same epochs, alternating (program, loop, then loop, program in
  the next round);
- **images/s per logged step over the epochs** of both: the epoch-start dip is the first steps of
  each epoch against the steady state (``dip``: the lowest of an epoch's first ``--settle`` steps,
  as a fraction of the steady state);
- **start-up**: the time from launching ``python -m cmd pretrain`` (a subprocess, ``--max_steps 1``)
  to the end of its first step (the first row of ``steps.csv``);
- **the k-NN monitor** (`cmd.cli.pretrain.knn_top1`, what ``--knn_every`` runs): seconds per call.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_program.py            # demo + mid, 3 epochs each (a few CPU minutes)
    python benchmarks/bench_program.py --quick                      # tiny settings, seconds (the smoke test)
    python benchmarks/bench_program.py --settings demo --rounds 2 --out benchmarks/results/program.json

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cmd
from cmd import training
from cmd.cli import pretrain  # the program itself is what this benchmark measures
from cmd.cli.options import parse_pretrain_args

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "program.json"

# options of each setting, on top of the program's defaults (--epochs / --no_knn / output are added per run)
SETTINGS: dict[str, list[str]] = {
    "demo": [],  # the demo recipe: the defaults of cmd-fgvc pretrain
    "mid": ["--arch", "vit_small", "--global_size", "96", "--local_size", "48", "--synthetic_image_size", "96",
            "--batch_size_per_gpu", "8", "--synthetic_per_class", "4"],
}
QUICK: dict[str, list[str]] = {
    "demo": ["--synthetic_per_class", "4", "--batch_size_per_gpu", "8"],
    "mid": ["--arch", "vit_tiny", "--global_size", "32", "--local_size", "16", "--synthetic_per_class", "4",
            "--batch_size_per_gpu", "8"],
}


# ------------------------------------------------------------------------------------------ bare loop
def bare_loop(argv: list[str], epochs: int) -> list[list[float]]:
    """The training step of the program, from the same public blocks and options, nothing else.

    Returns, per epoch, the wall time of each step (seconds, data loading included).
    """
    args = parse_pretrain_args(argv)
    args.epochs = epochs
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    # the same library blocks the program builds from its options (cmd.training), nothing else
    loader = training.build_train_loader(args, training.build_data(args, "train"), seed=args.seed,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    criterion = training.build_loss(args).to(device)
    outputs = criterion.student_outputs
    student = training.build_network(args, outputs=outputs).to(device)
    loader.sampler.set_epochs(0, epochs)
    steps_per_epoch = len(loader) // epochs
    ema = training.build_teacher(args, student, epochs * steps_per_epoch, check_finite=False)
    teacher = ema.teacher
    optimizer = training.build_optimizer(args, student)
    schedules = training.build_schedules(args, steps_per_epoch)
    lr, wd = schedules.lr, schedules.weight_decay
    precision = cmd.mixed_precision(device, args.amp)
    clip = args.clip_grad if args.clip_grad > 0 else float("inf")
    times: list[list[float]] = []
    step = 0
    for epoch, batches in enumerate(training.epoch_batches(iter(loader), [steps_per_epoch] * epochs)):
        student.train()
        times.append([])
        last = time.perf_counter()
        for crops, _ in batches:
            cmd.set_schedules(optimizer, lr=float(lr[step]), weight_decay=float(wd[step]))
            crops = [c.to(device, non_blocking=True) for c in crops]
            with precision.autocast():
                with torch.no_grad():
                    teacher_out = teacher(crops[:2], outputs=criterion.teacher_outputs)
                out = criterion(student(crops, outputs=outputs), teacher_out, epoch)
            optimizer.zero_grad(set_to_none=True)
            precision.backward(out.loss)
            precision.unscale_(optimizer)
            cmd.clip_gradients(student, clip)
            cmd.cancel_last_layer_gradients(student, epoch, args.freeze_last_layer)
            precision.step(optimizer)
            ema.update(student)
            step += 1
            float(out.loss.detach())  # the step is done (a no-op wait on the CPU, a sync on a GPU)
            now = time.perf_counter()
            times[-1].append(now - last)
            last = now
    return times


# ------------------------------------------------------------------------------------------ program
def run_program(argv: list[str], epochs: int, out_dir: Path) -> tuple[list[list[float]], dict]:
    """`cmd.cli.pretrain.main` in this process (--log_every 1); per epoch, the seconds of each step from steps.csv."""
    full = [*argv, "--epochs", str(epochs), "--log_every", "1", "--no_knn", "--no_progress", "--logger", "csv",
            "--output_dir", str(out_dir)]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = pretrain.main(full)
    args = parse_pretrain_args(full)
    rows = list(csv.DictReader((out_dir / "steps.csv").open()))
    per_epoch = len(rows) // epochs
    seconds = [args.batch_size_per_gpu / float(r["images_per_s"]) for r in rows]
    return [seconds[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)], summary


def startup_seconds(argv: list[str], out_dir: Path) -> float:
    """Seconds from launching ``python -m cmd pretrain`` to the end of its first step (steps.csv's first row)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "cmd", "pretrain", *argv, "--max_steps", "1", "--log_every", "1",
                             "--no_knn", "--no_progress", "--logger", "csv", "--output_dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    steps = out_dir / "steps.csv"
    first = None
    while proc.poll() is None:  # the first data row's arrival, as the file's modification time
        if first is None and steps.exists() and len(steps.read_text().splitlines()) >= 2:
            first = steps.stat().st_mtime
        time.sleep(0.005)
    output = proc.stdout.read()
    if proc.returncode != 75:  # cmd-fgvc pretrain's status for "interrupted, resumable" (--max_steps)
        raise RuntimeError(f"pretrain --max_steps 1 failed ({proc.returncode}):\n{output[-2000:]}")
    if first is None:
        first = steps.stat().st_mtime
    return first - t0


def knn_seconds(argv: list[str], calls: int) -> float:
    """Median seconds per call of the program's k-NN monitor (`cmd.cli.pretrain.knn_top1`) on a fresh teacher."""
    args = parse_pretrain_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    backbone = cmd.create_backbone(args.arch, pretrained=False, **args.backbone_kwargs).to(device).eval()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            pretrain.knn_top1(backbone, args, device, args.knn_k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ summary
def steady(per_epoch: list[list[float]], settle: int) -> list[float]:
    """Step times after each epoch's first ``settle`` steps (the first epoch's too: warm-up is its first steps)."""
    return [t for epoch in per_epoch for t in epoch[settle:]]


def summarise(per_epoch: list[list[float]], batch: int, settle: int) -> dict:
    rest = steady(per_epoch, settle) or [t for e in per_epoch for t in e]
    ips = batch / statistics.median(rest)
    dips = [min(batch / t for t in e[:settle]) / ips if e[:settle] else float("nan") for e in per_epoch]
    return {"images_per_s": ips, "epoch_start_min_fraction": dips,
            "images_per_s_per_step": [[batch / t for t in e] for e in per_epoch]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["demo", "mid"], choices=sorted(SETTINGS))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each program / bare-loop run")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (program-loop, then loop-program)")
    parser.add_argument("--settle", type=int, default=2, help="steps at each epoch's start left out of the steady state")
    parser.add_argument("--knn_calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, 2 epochs, 1 k-NN call (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    table = QUICK if args.quick else SETTINGS
    epochs, knn_calls = (2, 1) if args.quick else (args.epochs, args.knn_calls)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_program_") as tmp:
        for name in args.settings:
            options = table[name]
            batch = parse_pretrain_args(options).batch_size_per_gpu
            times: dict[str, list[list[float]]] = {"program": [], "loop": []}
            for r in range(args.rounds):
                for who in (("program", "loop") if r % 2 == 0 else ("loop", "program")):
                    if who == "program":
                        per_epoch, _ = run_program(options, epochs, Path(tmp) / f"{name}_{r}")
                    else:
                        per_epoch = bare_loop([*options, "--epochs", str(epochs)], epochs)
                    times[who] += per_epoch
            program, loop = (summarise(times[w], batch, args.settle) for w in ("program", "loop"))
            row = dict(setting=name, options=options, batch=batch, epochs=epochs, rounds=args.rounds,
                       program=program, loop=loop, loop_over_program=loop["images_per_s"] / program["images_per_s"],
                       startup_s=startup_seconds(options, Path(tmp) / f"{name}_startup"),
                       knn_s_per_call=knn_seconds(options, knn_calls))
            results.append(row)

    print(f"{'setting':8} {'program img/s':>13} {'loop img/s':>10} {'loop/program':>12} {'start-up s':>10} "
          f"{'k-NN s/call':>11}  epoch-start min (x steady), program | loop")
    for r in results:
        dips = lambda d: " ".join(f"{x:.2f}" for x in d["epoch_start_min_fraction"])  # noqa: E731
        print(f"{r['setting']:8} {r['program']['images_per_s']:13.1f} {r['loop']['images_per_s']:10.1f} "
              f"{r['loop_over_program']:12.3f} {r['startup_s']:10.2f} {r['knn_s_per_call']:11.2f}  "
              f"{dips(r['program'])} | {dips(r['loop'])}")
    for r in results:
        for who in ("program", "loop"):
            print(f"{r['setting']} {who} images/s per step:")
            for e, ips in enumerate(r[who]["images_per_s_per_step"]):
                print(f"  epoch {e + 1}: " + " ".join(f"{x:.0f}" for x in ips))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), quick=args.quick,
                device="cuda" if torch.cuda.is_available() else "cpu")
    tmp_out = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    tmp_out.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
