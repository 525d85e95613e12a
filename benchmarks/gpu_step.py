"""The GPU measurements of one call: the CMD step against the backbone step (eager and compiled), the fused
region path's peak memory, and the k-NN monitor's search over 50k x 768 features.

Three parts, side by side in one process (a table on stdout, everything in ``--out`` JSON):

1. **step**: `bench_train_step.Contender` ``backbone`` (the backbone alone, student forward + backward,
   teacher forward, clipping, AdamW, EMA: the floor of any self-distillation step) and ``cmd`` (the
   CMD step with `CMDLoss`), eager and ``torch.compile``'d (student and teacher networks), bf16
   autocast. Rounds alternate the four contenders (rotating order); medians of ``--repeats`` rounds
   and the per-round ratio ``cmd / backbone`` (target: <= 1.10 compiled). Default: Swin-T, batch 64,
   2 x 224 + 8 x 96 crops, K = 65536, head 2048 / 256 (the paper's setting).
2. **fused**: the peak memory of one CMD step, plain (`CMDLoss` on the [tokens, K] region logits) and
   fused (``CrossLevelHead(region_output="embedding")`` + ``CMDLoss(fused_chunk_size=c)``, the option
   ``--fused_region_chunk`` of ``cmd-fgvc pretrain``) for each ``--fused-chunks`` c, with its step time.
3. **knn**: `cmd.eval.KNNClassifier` fit + evaluate (k = 20, T = 0.07) with 50,000 x 768 train and
   10,000 test features (clustered, 200 classes) on the device, ``backend="torch"`` and ``"faiss"``
   (faiss on the CPU); median seconds and the agreement of their top-1.

Usage::

    python benchmarks/gpu_step.py                       # on a GPU machine (a few minutes)
    python benchmarks/gpu_step.py --parts step knn      # a subset
    python benchmarks/gpu_step.py --dry_run             # the same code paths on the CPU, tiny shapes, seconds

``--dry_run`` runs everything on the CPU with a 1-block ViT-Tiny, batch 2, 2 x 32 +
2 x 16 crops, K = 256, ``torch.compile(backend="eager")`` (dynamo without inductor's C++ build) and
2,000 x 64 k-NN features; its numbers mean nothing, it checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_step as bts  # noqa: E402  (the step contenders: same code as bench_train_step.py)

import cmd  # noqa: E402
from cmd.eval import KNNClassifier  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_step.json"
SWIN_T = ["--arch", "swin_tiny", "--batch", "64", "--out-dim", "65536", "--global-size", "224", "--local-size", "96",
          "--local-crops", "8", "--hidden-dim", "2048", "--bottleneck-dim", "256"]
DRY = ["--arch", "vit_tiny", "--backbone-kwargs", '{"depth": 1}',
       "--batch", "2", "--out-dim", "256", "--global-size", "32", "--local-size", "16", "--local-crops", "2",
       "--hidden-dim", "64", "--bottleneck-dim", "32"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _crops(step_args, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sizes = [step_args.global_size] * 2 + [step_args.local_size] * step_args.local_crops
    return [torch.randn(step_args.batch, 3, s, s, generator=g).to(device) for s in sizes]


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def step_part(step_argv: list[str], device: torch.device, repeats: int, warmup: int, compile_backend: str) -> dict:
    """CMD vs backbone step, eager and compiled, alternating rounds."""
    base = bts.parse_args([*step_argv, "--device", device.type, "--amp"])
    crops = _crops(base, device)
    contenders = {}
    for compiled in (False, True):
        for name in ("backbone", "cmd"):
            c = bts.Contender(name, base, crops, device)
            if compiled:  # what bench_train_step's --compile does, with a choosable backend
                c.student_fwd = torch.compile(c.student_fwd, backend=compile_backend)
                c.teacher_fwd = torch.compile(c.teacher_fwd, backend=compile_backend)
            contenders[f"{name}{' compiled' if compiled else ''}"] = c
    first = {n: _timed(c.step, device) for n, c in contenders.items()}  # compilation, optimiser state
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            t = _timed(contenders[n].step, device)
            if r >= warmup:
                times[n].append(t)
    rows = []
    for n in names:
        med = statistics.median(times[n])
        backbone = "backbone compiled" if "compiled" in n else "backbone"
        ratios = sorted(a / b for a, b in zip(times[n], times[backbone]))
        rows.append(dict(contender=n, step_ms=1e3 * med, images_per_s=base.batch / med, first_step_s=first[n],
                         vs_backbone_median_of_rounds=statistics.median(ratios), vs_backbone_min=ratios[0],
                         vs_backbone_max=ratios[-1], runs_ms=[1e3 * t for t in times[n]]))
    del contenders
    return dict(setting=_setting(base), rows=rows)


def fused_part(step_argv: list[str], device: torch.device, chunks: list[int], repeats: int) -> dict:
    """Peak memory and step time of one CMD step, plain and fused at each chunk size."""
    rows = []
    for chunk in [None, *chunks]:
        argv = [*step_argv, "--device", device.type, "--amp"] + (["--fused-chunk", str(chunk)] if chunk else [])
        step_args = bts.parse_args(argv)
        c = bts.Contender("cmd-fused" if chunk else "cmd", step_args, _crops(step_args, device), device)
        c.step()  # optimiser state exists before the measured step
        peak = bts.peak_memory(c)
        ms = 1e3 * statistics.median(_timed(c.step, device) for _ in range(repeats))
        rows.append(dict(contender="cmd" if chunk is None else f"cmd-fused chunk={chunk}", peak_mib=peak / 2**20,
                         step_ms=ms))
        del c
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain = rows[0]["peak_mib"]
    for r in rows:
        r["peak_vs_plain"] = r["peak_mib"] / plain
    return dict(rows=rows, memory=("cuda max_memory_allocated above the step's start" if device.type == "cuda"
                                   else "peak bytes of tensor storages alive during one step (TorchDispatchMode)"))


def knn_part(n_train: int, n_test: int, dim: int, classes: int, device: torch.device, repeats: int) -> dict:
    """KNNClassifier fit + evaluate, torch and faiss backends, alternating."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g)
    train_y = torch.arange(n_train) % classes
    test_y = torch.arange(n_test) % classes
    train = (centers[train_y] + 2.0 * torch.randn(n_train, dim, generator=g)).to(device)
    test = (centers[test_y] + 2.0 * torch.randn(n_test, dim, generator=g)).to(device)
    times: dict[str, list[float]] = {"torch": [], "faiss": []}
    top1 = {}
    for r in range(repeats + 1):
        for backend in (("torch", "faiss") if r % 2 == 0 else ("faiss", "torch")):
            def run(backend=backend):
                knn = KNNClassifier(k=(20,), temperature=0.07, num_classes=classes, backend=backend)
                top1[backend] = knn.fit(train, train_y).evaluate(test, test_y)[20]["top1"]
            t = _timed(run, device)
            if r:  # the first round warms up (CUDA context, faiss threads)
                times[backend].append(t)
    return dict(n_train=n_train, n_test=n_test, dim=dim, classes=classes, device=str(device),
                rows=[dict(backend=b, seconds=statistics.median(t), top1=top1[b]) for b, t in times.items()])


def _setting(a) -> str:
    return (f"{a.arch} {a.backbone_kwargs or ''} B={a.batch} 2x{a.global_size}+{a.local_crops}x{a.local_size} "
            f"K={a.out_dim} head {a.hidden_dim}/{a.bottleneck_dim} bf16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", default=["step", "fused", "knn"], choices=["step", "fused", "knn"])
    p.add_argument("--dry_run", action="store_true", help="the same code paths on the CPU with tiny shapes (seconds)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10; dry run 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first step (default 3; dry run 0)")
    p.add_argument("--fused-chunks", type=int, nargs="+", default=None, help="fused_chunk_size values (default 16 64)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py needs CUDA; --dry_run runs its code paths on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    repeats = args.repeats or (1 if dry else 10)
    warmup = args.warmup if args.warmup is not None else (0 if dry else 3)
    chunks = args.fused_chunks or ([1] if dry else [16, 64])
    step_argv = DRY if dry else SWIN_T
    if dry:
        torch.set_num_threads(1)
    result: dict = {}
    if "step" in args.parts:
        result["step"] = step_part(step_argv, device, repeats, warmup, args.compile_backend or ("eager" if dry else "inductor"))
    if "fused" in args.parts:
        result["fused"] = fused_part(step_argv, device, chunks, max(1, repeats // 2))
    if "knn" in args.parts:
        size = (2000, 500, 64, 20) if dry else (50_000, 10_000, 768, 200)
        result["knn"] = knn_part(*size, device=device, repeats=max(1, repeats // 3))

    if "step" in result:
        print(result["step"]["setting"])
        print(f"{'contender':20} {'step ms':>9} {'img/s':>8} {'x backbone':>10} {'[min, max]':>12} {'1st step s':>10}")
        for r in result["step"]["rows"]:
            print(f"{r['contender']:20} {r['step_ms']:9.1f} {r['images_per_s']:8.1f} {r['vs_backbone_median_of_rounds']:10.3f} "
                  f"[{r['vs_backbone_min']:4.2f}, {r['vs_backbone_max']:4.2f}] {r['first_step_s']:10.1f}")
    if "fused" in result:
        print(f"\n{'region path':24} {'peak MiB':>9} {'x plain':>7} {'step ms':>9}")
        for r in result["fused"]["rows"]:
            print(f"{r['contender']:24} {r['peak_mib']:9.1f} {r['peak_vs_plain']:7.2f} {r['step_ms']:9.1f}")
    if "knn" in result:
        k = result["knn"]
        print(f"\nk-NN {k['n_train']} x {k['dim']} train, {k['n_test']} test ({k['device']})")
        for r in k["rows"]:
            print(f"  {r['backend']:6} {r['seconds']:8.2f} s  top-1 {r['top1']:.2f} %")

    meta = dict(dry_run=dry, device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, cmd=getattr(cmd, "__version__", None), repeats=repeats, warmup=warmup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, **result), indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
