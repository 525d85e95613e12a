"""Benchmark: `CMDLoss` (presets "esvit" and "cmd") against a straightforward per-pair loop, forward + backward.

The baseline below is the obvious implementation of the same equations (EsViT's per-pair loop, plus a
per-crop loop for the CMD inter-level term): for every pair (g, v != g) a log-softmax of the student's
image and region logits, a gather of the matched teacher regions and a cross-entropy. `CMDLoss`
aggregates the targets of each student crop before one fused cross-entropy per crop.

Runs alternate between the contenders: for one preset after the other, every round runs the loop and
CMDLoss back to back, the first of the pair alternating. Reported, CMDLoss / loop for the same preset:
``time x`` the ratio of the median wall times, ``paired x`` the median of the per-round ratios (robust
when other processes load the machine), ``cpu x`` the ratio of the median process CPU times.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs. On the CPU, a
``TorchDispatchMode`` sees every tensor that an operator (forward, backward, and inside custom autograd
functions) returns, tracks each new storage until it is freed (weak references) and reports the
largest number of bytes alive at once above the inputs: what torch allocated for the step, without the
allocator's own overhead. It runs in a separate, untimed pass.

Usage::

    python benchmarks/bench_losses.py                     # CPU setting (+ the GPU setting with CUDA)
    python benchmarks/bench_losses.py --repeats 11 --threads 1 --out benchmarks/results/losses.json

CPU setting: K=4096, B=8, Swin-T token counts 49 / 9, 2 + 8 crops. GPU: K=65536, B=64.
Logits are ``logit_scale * N(0, 1)``; at 1.0 a temperature-0.04 teacher softmax underflows to sub-normal
numbers for about a quarter of K, which costs the CPU much time in every op that touches them (CMDLoss
flushes them to 0 once); at 0.3 (cosine-like logits of a weight-normalised head) there are none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cmd.heads.output import CrossLevelOutput
from cmd.losses import CMDLoss

RESULTS = Path(__file__).resolve().parent / "results" / "losses.json"
PRESETS = ("esvit", "cmd")


# --------------------------------------------------------------------------- baseline
class PerPairLoopLoss:
    """The straightforward implementation: loops over pairs (I, R) and crops (S), as EsViT's code does."""

    def __init__(self, out_dim: int, n_global: int, n_crops: int, *, image_weight: float, region_weight: float,
                 inter_weight: float, device: torch.device) -> None:
        self.center = torch.zeros(1, out_dim, device=device)
        self.region_center = torch.zeros(1, out_dim, device=device)
        self.G, self.V = n_global, n_crops
        self.wi, self.wr, self.ws = image_weight, region_weight, inter_weight
        self.tau_s, self.m = 0.1, 0.9

    def __call__(self, student: list[CrossLevelOutput], teacher: CrossLevelOutput, tau_t: float) -> torch.Tensor:
        G, B = self.G, teacher.image.shape[0] // self.G
        t_img = F.softmax((teacher.image.float() - self.center) / tau_t, dim=-1).detach().chunk(G)
        t_reg = F.softmax((teacher.region.float() - self.region_center) / tau_t, dim=-1).detach().chunk(G)
        t_fea = teacher.tokens.chunk(G)
        s_img = [c for o in student for c in (o.image.float() / self.tau_s).chunk(o.image.shape[0] // B)]
        s_reg = [c for o in student for c in (o.region.float() / self.tau_s).chunk(o.image.shape[0] // B)]
        s_fea = [c for o in student for c in o.tokens.chunk(o.image.shape[0] // B)]
        s_w = [c for o in student for c in o.mil_weights.chunk(o.image.shape[0] // B)]
        total, n_pairs = 0.0, 0
        for g in range(G):
            for v in range(self.V):
                if v == g:
                    continue
                loss = self.wi * torch.sum(-t_img[g] * F.log_softmax(s_img[v], dim=-1), dim=-1)
                sim = torch.matmul(F.normalize(s_fea[v], dim=-1), F.normalize(t_fea[g], dim=-1).transpose(1, 2))
                idx = sim.max(dim=2)[1]
                target = torch.gather(t_reg[g], 1, idx.unsqueeze(2).expand(-1, -1, t_reg[g].shape[2]))
                loss = loss + self.wr * torch.sum(-target * F.log_softmax(s_reg[v], dim=-1), dim=-1).mean(-1)
                total = total + loss.mean()
                n_pairs += 1
        total = total / n_pairs
        if self.ws > 0:
            inter = 0.0
            for v in range(self.V):
                log_q = F.log_softmax(s_reg[v], dim=-1)
                log_b = torch.logsumexp(s_w[v].float().log().unsqueeze(-1) + log_q, dim=1)
                log_p = F.log_softmax(s_img[v], dim=-1)
                inter = inter + (log_b.exp() * (log_b - log_p)).sum(-1).mean()
            total = total + self.ws * inter / self.V
        with torch.no_grad():
            self.center = self.center * self.m + teacher.image.float().mean(0, keepdim=True) * (1 - self.m)
            flat = teacher.region.float().reshape(-1, teacher.region.shape[-1])
            self.region_center = self.region_center * self.m + flat.mean(0, keepdim=True) * (1 - self.m)
        return total


# --------------------------------------------------------------------------- memory
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the context and alive at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


# --------------------------------------------------------------------------- inputs
def make_inputs(batch, out_dim, tokens, n_global, n_local, dim, scale, device, dtype, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def group(crops, n, grad):
        rows = crops * batch
        tensors = [
            torch.randn(rows, out_dim, generator=g, device=device) * scale,
            torch.randn(rows, n, out_dim, generator=g, device=device) * scale,
            torch.randn(rows, n, dim, generator=g, device=device),
            torch.softmax(torch.randn(rows, n, generator=g, device=device), -1),
        ]
        tensors = [t.to(dtype=dtype if i < 2 else torch.float32) for i, t in enumerate(tensors)]
        if grad:
            for i in (0, 1, 3):
                tensors[i].requires_grad_()
        return CrossLevelOutput(*tensors)

    student = [group(n_global, tokens[0], True), group(n_local, tokens[1], True)]
    teacher = group(n_global, tokens[0], False)
    return student, teacher


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(student):
    for o in student:
        for t in (o.image, o.region, o.mil_weights):
            t.grad = None


def run_setting(name, *, batch, out_dim, tokens, dim, scale, device, dtype, repeats, warmup):
    n_global, n_local = 2, 8
    student, teacher = make_inputs(batch, out_dim, tokens, n_global, n_local, dim, scale, device, dtype)
    tau_t = 0.04
    contenders = {}
    for preset in PRESETS:
        weights = {k: v for k, v in CMDLoss.PRESETS[preset].items() if k != "cross_weight"}
        loop = PerPairLoopLoss(out_dim, n_global, n_global + n_local, device=device, **weights)
        ours = CMDLoss.from_preset(preset, out_dim=out_dim, n_local_crops=n_local).to(device)
        contenders[("loop", preset)] = lambda loop=loop: loop(student, teacher, tau_t)
        contenders[("CMDLoss", preset)] = lambda ours=ours: ours(student, [teacher], 0).loss

    # same values (centers move identically in both)
    for preset in PRESETS:
        a, b = contenders[("loop", preset)](), contenders[("CMDLoss", preset)]()
        if not torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"{preset}: loop {float(a)} != CMDLoss {float(b)}")

    # Rounds: a preset's two contenders run back to back, the first of the pair alternating, so that a
    # pair shares the machine's load of the moment (the machine may be shared and noisy).
    times = {k: [] for k in contenders}
    cpu_times = {k: [] for k in contenders}
    for preset in PRESETS:  # one preset after the other, as a training run calls one loss repeatedly
        pair = [("loop", preset), ("CMDLoss", preset)]
        for r in range(warmup + repeats):
            for key in pair if r % 2 == 0 else pair[::-1]:
                _zero_grads(student)
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                contenders[key]().backward()
                _sync(device)
                if r >= warmup:
                    times[key].append(time.perf_counter() - t0)
                    cpu_times[key].append(time.process_time() - c0)

    peaks = {}
    for key, fn in contenders.items():
        _zero_grads(student)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn().backward()
            torch.cuda.synchronize(device)
            peaks[key] = torch.cuda.max_memory_allocated(device) - base
        else:
            with PeakTensorMemory() as tracker:
                fn().backward()
            peaks[key] = tracker.peak
    _zero_grads(student)

    rows = []
    for preset in PRESETS:
        loop_t, ours_t = times[("loop", preset)], times[("CMDLoss", preset)]
        loop_c, ours_c = cpu_times[("loop", preset)], cpu_times[("CMDLoss", preset)]
        rows.append(
            dict(
                setting=name,
                preset=preset,
                loop_ms=1e3 * statistics.median(loop_t),
                cmdloss_ms=1e3 * statistics.median(ours_t),
                time_ratio=statistics.median(ours_t) / statistics.median(loop_t),
                paired_time_ratio=statistics.median(o / lo for o, lo in zip(ours_t, loop_t)),
                cpu_time_ratio=statistics.median(ours_c) / statistics.median(loop_c),
                loop_peak_mib=peaks[("loop", preset)] / 2**20,
                cmdloss_peak_mib=peaks[("CMDLoss", preset)] / 2**20,
                memory_ratio=peaks[("CMDLoss", preset)] / peaks[("loop", preset)],
                loop_runs_ms=[1e3 * t for t in loop_t],
                cmdloss_runs_ms=[1e3 * t for t in ours_t],
            )
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the CPU setting, and the GPU setting too when CUDA is available")
    parser.add_argument("--repeats", type=int, default=11, help="timed runs per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--logit-scales", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--gpu-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = []
    if args.device in ("auto", "cpu"):
        for scale in args.logit_scales:
            settings.append((f"cpu K=4096 B=8 s={scale}", dict(batch=8, out_dim=4096, tokens=(49, 9), dim=768,
                             scale=scale, device=torch.device("cpu"), dtype=torch.float32)))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        dtype = getattr(torch, args.gpu_dtype)
        for scale in args.logit_scales:
            settings.append((f"cuda K=65536 B=64 {args.gpu_dtype} s={scale}",
                             dict(batch=64, out_dim=65536, tokens=(49, 9), dim=768, scale=scale,
                                  device=torch.device("cuda"), dtype=dtype)))

    rows = []
    for name, kw in settings:
        rows += run_setting(name, repeats=args.repeats, warmup=args.warmup, **kw)

    header = (
        f"{'setting':30} {'preset':6} {'loop ms':>8} {'CMDLoss ms':>10} {'time x':>6} {'paired x':>8} {'cpu x':>6} "
        f"{'loop MiB':>8} {'CMDLoss MiB':>11} {'mem x':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['setting']:30} {r['preset']:6} {r['loop_ms']:8.1f} {r['cmdloss_ms']:10.1f} {r['time_ratio']:6.2f} "
            f"{r['paired_time_ratio']:8.2f} {r['cpu_time_ratio']:6.2f} {r['loop_peak_mib']:8.1f} "
            f"{r['cmdloss_peak_mib']:11.1f} {r['memory_ratio']:6.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
