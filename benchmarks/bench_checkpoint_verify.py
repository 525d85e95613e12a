"""Benchmark the integrity checks of `cmd.read_checkpoint`: what verifying a checkpoint costs.

A checkpoint of about ``--mib`` MiB of float32 weights (a student and a teacher of equal size,
written by `cmd.save_checkpoint`, so it stores per-tensor checksums) is read repeatedly, the file
in the page cache (a warm-up read first). Contenders, medians over ``--repeats``:

* ``torch.load``: the load alone (``weights_only=True``), no check;
* ``zip CRC pass``: `corrupt_member`, the CRC-32 of every zip member (what a0af744 ran before every load);
* ``tensor checksums``: the CRC-32 of every loaded tensor compared with the stored checksums;
* ``load + zip CRC (a0af744)``: the old `read_checkpoint` (zip CRC pass, then the load);
* ``read_checkpoint (now)``: the load, the tensor checksums, the zip CRC of the small members.

Usage:
    python benchmarks/bench_checkpoint_verify.py --mib 256 --repeats 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from cmd._integrity import corrupt_member, mismatched_tensors
from cmd.checkpoint import read_checkpoint, save_checkpoint

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_checkpoint_verify.json")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=256.0, help="size of the weights in MiB (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    n_tensors = 64
    per_tensor = max(1, int(args.mib * 2**20 / 4 / 2 / n_tensors))  # float32, student + teacher
    torch.manual_seed(0)
    net = {f"block{i}.weight": torch.randn(per_tensor) for i in range(n_tensors)}
    with tempfile.TemporaryDirectory() as folder:
        path = save_checkpoint(os.path.join(folder, "ckpt.pt"), student=net, teacher={k: v.clone() for k, v in net.items()},
                               epoch=1)
        size = os.path.getsize(path)
        read_checkpoint(path)  # warm the page cache
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        contenders = {
            "torch.load": lambda: torch.load(path, map_location="cpu", weights_only=True),
            "zip CRC pass": lambda: corrupt_member(path),
            "tensor checksums": lambda: mismatched_tensors(loaded, loaded["checksums"]),
            "load + zip CRC (a0af744)": lambda: (corrupt_member(path),
                                                 torch.load(path, map_location="cpu", weights_only=True)),
            "read_checkpoint (now)": lambda: read_checkpoint(path),
        }
        seconds = {name: _median_seconds(fn, args.repeats) for name, fn in contenders.items()}

    base = seconds["torch.load"]
    print(f"checkpoint {size / 2**20:.0f} MiB, {args.repeats} repeats, {args.threads} thread(s), page cache warm")
    print(f"{'contender':<28}{'seconds':>10}{'GiB/s':>9}{'x load':>9}")
    for name, value in seconds.items():
        print(f"{name:<28}{value:>10.3f}{size / 2**30 / value:>9.2f}{value / base:>9.2f}")
    overhead = seconds["read_checkpoint (now)"] - base
    print(f"verification overhead now: {overhead:.3f} s ({overhead / base * 100:.0f} % of the load, "
          f"{overhead / (size / 2**30):.2f} s per GiB)")
    result = {
        "file_mib": size / 2**20, "repeats": args.repeats, "threads": args.threads,
        "platform": platform.platform(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "seconds": seconds, "overhead_seconds": overhead, "overhead_fraction_of_load": overhead / base,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
