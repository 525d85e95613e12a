"""Benchmark one full CMD training step against the backbone-only step and a per-pair loop loss.

Contenders (each with its own student, EMA teacher, AdamW and loss, all from the same initial weights):

- ``backbone``: the backbone alone. Student backbone forward + backward on a plain loss (mean of the
  pooled vectors and tokens), teacher backbone forward on the global crops (no grad), per-parameter
  clipping, AdamW, EMA update. The floor any self-distillation step sits on.
- ``cmd``: the CMD step. ``CMDNetwork`` student on all crops, teacher on the global crops (no grad),
  ``CMDLoss`` (aggregated targets), backward, clipping, AdamW, EMA update.
- ``cmd-fused``: the same step with the region head's prototype layer fused into the loss
  (``CrossLevelHead(region_output="embedding")`` + ``CMDLoss(fused_chunk_size=...)``): the student's
  float32 [tokens, K] region logits are never materialised; they are recomputed per chunk of images.
- ``loop``: the same step as ``cmd`` with a straightforward per-pair loop implementation of the loss
  (written below from the equations: per (g, v) pair image and region cross-entropies with per-pair
  region matching, and a per-crop loop for the inter-level term).

Rounds alternate the contenders (the order rotates every round); the table gives medians over the
timed rounds and the ratios of the medians to ``cmd``'s and ``backbone``'s. Data loading is not
timed: the crops are fixed random tensors on the device.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during one step above what was allocated
before it. On the CPU, a ``TorchDispatchMode`` tracks every tensor storage that an operator returns
(forward, backward, optimiser, EMA) during one untimed step until it is freed, and reports the largest
number of bytes alive at once: what torch allocated for the step, without the allocator's overhead.

On CUDA the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``) and the measured bf16
matrix-multiply peak (an 8192^3 ``torch.mm``) give the fraction of the peak each step reaches.

Usage::

    python benchmarks/bench_train_step.py                          # CPU default: tiny ViT, K = 4096
    python benchmarks/bench_train_step.py --smoke                  # seconds (CI)
    python benchmarks/bench_train_step.py --profile                # + where the time goes, by op
    python benchmarks/bench_train_step.py --device cuda --amp      # Swin-T, B = 64, 2x224 + 8x96, K = 65536
    python benchmarks/bench_train_step.py --device cuda --amp --arch vit_small --batch 32 --compile
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

import cmd
from cmd.heads.output import CrossLevelOutput

RESULTS = Path(__file__).resolve().parent / "results" / "train_step.json"
CONTENDERS = ("backbone", "cmd", "cmd-fused", "loop")
# the fused region loss is an opt-in of CrossLevelHead / CMDLoss; skipped where the library lacks it
HAS_FUSED = "region_output" in inspect.signature(cmd.CrossLevelHead).parameters

# Defaults per device: (arch, backbone kwargs, batch, K, global px, local px, local crops, head hidden, bottleneck)
DEFAULTS = {
    # K = 4096 is 16x below the paper's 65536; the MLP is scaled down with it (2048 -> 512) so that the
    # prototype layer still costs about twice the MLP per token, as in the paper's head (16.8M vs 6.3M MACs).
    "cpu": dict(arch="vit_tiny", backbone_kwargs={"depth": 2}, batch=8, out_dim=4096, global_size=96,
                local_size=48, local_crops=8, hidden_dim=512, bottleneck_dim=256),
    "cuda": dict(arch="swin_tiny", backbone_kwargs={}, batch=64, out_dim=65536, global_size=224,
                 local_size=96, local_crops=8, hidden_dim=2048, bottleneck_dim=256),
    "smoke": dict(arch="vit_tiny", backbone_kwargs={"depth": 1}, batch=2, out_dim=256, global_size=32,
                  local_size=16, local_crops=2, hidden_dim=64, bottleneck_dim=32),
}


# --------------------------------------------------------------------------- the per-pair loop loss
class PerPairLoopLoss:
    """The straightforward CMD loss: a Python loop over (g, v) pairs and one over crops.

    Same equations and weights as ``CMDLoss`` (method.md section 3) with the center updates after the
    loss, but every pair recomputes its own log-softmaxes, matching and cross-entropies.
    """

    def __init__(self, out_dim: int, n_global: int, n_crops: int, *, image_weight: float, region_weight: float,
                 inter_weight: float, student_temp: float = 0.1, center_momentum: float = 0.9,
                 device: torch.device) -> None:
        self.center = torch.zeros(1, out_dim, device=device)
        self.region_center = torch.zeros(1, out_dim, device=device)
        self.n_global, self.n_crops = n_global, n_crops
        self.image_weight, self.region_weight, self.inter_weight = image_weight, region_weight, inter_weight
        self.student_temp, self.center_momentum = student_temp, center_momentum

    def __call__(self, student: list[CrossLevelOutput], teacher: list[CrossLevelOutput], teacher_temp: float):
        b = teacher[0].image.shape[0] // self.n_global
        s_crops = [c for o in student for c in o.split(o.batch_size // b)]
        t_crops = [c for o in teacher for c in o.split(o.batch_size // b)]
        with torch.autocast(device_type=self.center.device.type, enabled=False):
            t_image = [torch.softmax((t.image.float() - self.center) / teacher_temp, -1).detach() for t in t_crops]
            t_region = [torch.softmax((t.region.float() - self.region_center) / teacher_temp, -1).detach()
                        for t in t_crops]
            total, n_pairs = 0.0, 0
            for g, t in enumerate(t_crops):
                t_unit = F.normalize(t.tokens.detach().float(), dim=-1)
                for v, s in enumerate(s_crops):
                    if v == g:
                        continue
                    log_p = torch.log_softmax(s.image.float() / self.student_temp, -1)
                    image_ce = -(t_image[g] * log_p).sum(-1).mean()
                    sim = F.normalize(s.tokens.detach().float(), dim=-1) @ t_unit.transpose(1, 2)
                    match = sim.argmax(dim=-1)  # [B, N_v]
                    target = torch.gather(t_region[g], 1, match.unsqueeze(-1).expand(-1, -1, t_region[g].shape[-1]))
                    log_q = torch.log_softmax(s.region.float() / self.student_temp, -1)
                    region_ce = -(target * log_q).sum(-1).mean()
                    total = total + self.image_weight * image_ce + self.region_weight * region_ce
                    n_pairs += 1
            total = total / n_pairs
            if self.inter_weight > 0:
                inter = 0.0
                for s in s_crops:
                    log_q = torch.log_softmax(s.region.float() / self.student_temp, -1)
                    w = s.mil_weights.float()
                    log_b = torch.logsumexp((w / w.sum(-1, keepdim=True)).log().unsqueeze(-1) + log_q, dim=1)
                    log_p = torch.log_softmax(s.image.float() / self.student_temp, -1)
                    inter = inter + (log_b.exp() * (log_b - log_p)).sum(-1).mean()
                total = total + self.inter_weight * inter / len(s_crops)
            with torch.no_grad():
                m = self.center_momentum
                image_mean = torch.cat([t.image.float() for t in teacher]).mean(0, keepdim=True)
                region_mean = torch.cat([t.region.float().flatten(0, 1) for t in teacher]).mean(0, keepdim=True)
                self.center = self.center * m + image_mean * (1 - m)
                self.region_center = self.region_center * m + region_mean * (1 - m)
        return total


# --------------------------------------------------------------------------- memory on the CPU
class PeakTensorBytes(TorchDispatchMode):
    """Largest number of bytes of tensor storages created inside the context and alive at once."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.alive.items() if ref.expired()]:
            self.current -= self.alive.pop(key)[1]
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() and storage.data_ptr() not in self.alive:
                    self.alive[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


# --------------------------------------------------------------------------- contenders
class Contender:
    """One training setup: networks, optimiser, EMA teacher, loss, and its ``step()``."""

    def __init__(self, name: str, args, crops: list[torch.Tensor], device: torch.device) -> None:
        self.name, self.args, self.crops, self.device = name, args, crops, device
        torch.manual_seed(0)  # the same initial weights for every contender
        backbone = cmd.create_backbone(args.arch, pretrained=False, **args.backbone_kwargs)
        if name == "backbone":
            self.student: torch.nn.Module = backbone
        else:
            extra = {"region_output": "embedding"} if name == "cmd-fused" else {}
            head = cmd.CrossLevelHead(
                backbone.embed_dim, out_dim=args.out_dim, pooling="gated_attention",
                hidden_dim=args.hidden_dim, bottleneck_dim=args.bottleneck_dim, **extra,
            )
            self.student = cmd.CMDNetwork(backbone, head)
        self.student.to(device)
        if args.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.ema = cmd.EMATeacher(self.student, momentum=0.996)
        # fused AdamW: one kernel per step on CUDA, and 3x faster than the per-tensor loop on the CPU too
        self.optimizer = torch.optim.AdamW(cmd.param_groups(self.student, weight_decay=0.04), lr=1e-4,
                                           fused=not args.unfused_adamw or None)
        preset = dict(image_weight=0.5, region_weight=0.5, inter_weight=0.1)
        if name in ("cmd", "cmd-fused"):
            extra = {"fused_chunk_size": args.fused_chunk} if name == "cmd-fused" else {}
            self.criterion = cmd.CMDLoss(args.out_dim, n_global_crops=2, n_local_crops=args.local_crops, **preset,
                                         **extra).to(device)
        elif name == "loop":
            self.criterion = PerPairLoopLoss(args.out_dim, 2, 2 + args.local_crops, device=device, **preset)
        self.student_fwd = self.student.forward_multicrop if name == "backbone" else self.student
        self.teacher_fwd = self.ema.teacher.forward_multicrop if name == "backbone" else self.ema.teacher
        if args.compile:
            self.student_fwd = torch.compile(self.student_fwd)
            self.teacher_fwd = torch.compile(self.teacher_fwd)
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.amp
                         else torch.autocast(device_type=device.type, enabled=False))

    def loss(self) -> torch.Tensor:
        crops = self.crops
        # the loss says which outputs it reads (the fused student gives region_embedding + prototypes)
        kwargs = {} if self.name in ("backbone", "loop") else {"outputs": self.criterion.student_outputs}
        with torch.no_grad():
            teacher_out = self.teacher_fwd(crops[:2], **({"outputs": self.criterion.teacher_outputs} if kwargs else {}))
        student_out = self.student_fwd(crops, **kwargs)
        if self.name == "backbone":
            return sum(o.pooled.float().mean() + o.tokens.float().mean() for o in student_out)
        if self.name == "loop":
            return self.criterion(student_out, teacher_out, teacher_temp=0.04)
        return self.criterion(student_out, teacher_out, epoch=0).loss

    def step(self) -> torch.Tensor:
        with self.autocast:
            loss = self.loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        cmd.clip_gradients(self.student, 3.0)
        self.optimizer.step()
        self.ema.update(self.student)
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(contender: Contender) -> int:
    device = contender.device
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        contender.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with PeakTensorBytes() as tracker:
        contender.step()
    return tracker.peak


def step_flops(contender: Contender) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        contender.step()
    return counter.get_total_flops()


def bf16_matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-multiply throughput in FLOP/s (the best of ``repeats`` runs)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def profile_steps(contender: Contender, steps: int, top: int) -> list[dict]:
    """Self time by op over ``steps`` steps (torch.profiler), the ``top`` most expensive ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if contender.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            contender.step()
        _sync(contender.device)
    key = "self_cuda_time_total" if contender.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    return [dict(op=e.key, self_ms=getattr(e, key, 0) / 1e3 / steps, share=getattr(e, key, 0) / total,
                 calls=e.count // steps) for e in events[:top]]


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default=None, help="backbone (timm name or alias); default per device")
    p.add_argument("--backbone-kwargs", type=json.loads, default=None, help='timm kwargs as JSON, e.g. \'{"depth": 2}\'')
    p.add_argument("--batch", type=int, default=None, help="images per step")
    p.add_argument("--out-dim", type=int, default=None, help="K, prototypes of both heads")
    p.add_argument("--local-crops", type=int, default=None, help="L (plus 2 global crops)")
    p.add_argument("--global-size", type=int, default=None)
    p.add_argument("--local-size", type=int, default=None)
    p.add_argument("--hidden-dim", type=int, default=None, help="heads' MLP width (2048)")
    p.add_argument("--bottleneck-dim", type=int, default=None, help="heads' bottleneck (256)")
    p.add_argument("--fused-chunk", type=int, default=None,
                   help="crop-images per chunk of the fused region loss (default: the batch, one crop of every image)")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS,
                   default=[c for c in CONTENDERS if HAS_FUSED or c != "cmd-fused"])
    p.add_argument("--compile", action="store_true", help="torch.compile the student and teacher networks")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--unfused-adamw", action="store_true", help="torch's default AdamW instead of fused=True")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; smoke 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on the CPU: 1, stable on a shared machine where several "
                        "OpenMP threads competing with other processes run up to 10x slower; 0: torch's default)")
    p.add_argument("--profile", action="store_true", help="also profile cmd and loop by op (torch.profiler)")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--smoke", action="store_true", help="tiny settings that run in seconds (CI)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    defaults = DEFAULTS["smoke" if args.smoke else args.device]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.fused_chunk is None:
        args.fused_chunk = args.batch
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(args.batch, 3, args.global_size, args.global_size, generator=g) for _ in range(2)]
    crops += [torch.randn(args.batch, 3, args.local_size, args.local_size, generator=g)
              for _ in range(args.local_crops)]
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    crops = [c.to(device).contiguous(memory_format=fmt) for c in crops]

    contenders = {name: Contender(name, args, crops, device) for name in args.contenders}
    if "cmd" in contenders and "loop" in contenders:  # the loop is the same loss: same value on the same outputs
        a, b = contenders["cmd"], contenders["loop"]
        with torch.no_grad(), a.autocast:
            s, t = a.student(crops), a.ema.teacher(crops[:2])
            ours = a.criterion(s, t, epoch=0, update_centers=False).loss
            loop = copy.deepcopy(b.criterion)(s, t, teacher_temp=0.04)
        if not torch.allclose(ours.double(), loop.double(), rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"CMDLoss {float(ours)} != per-pair loop {float(loop)} on the same outputs")

    first_step_s = {}
    for name, c in contenders.items():  # the first step: compilation, lazy optimiser state
        _sync(device)
        t0 = time.perf_counter()
        c.step()
        _sync(device)
        first_step_s[name] = time.perf_counter() - t0
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    for r in tqdm(range(args.warmup + args.repeats), desc="rounds", leave=False):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            contenders[name].step()
            _sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)
    peaks = {n: peak_memory(c) for n, c in contenders.items()}
    flops, matmul_peak = {}, None
    if device.type == "cuda":
        flops = {n: step_flops(c) for n, c in contenders.items()}
        matmul_peak = bf16_matmul_peak(device)

    med = {n: statistics.median(t) for n, t in times.items()}
    cpu_med = {n: statistics.median(t) for n, t in cpu_times.items()}
    rows = []
    for n in names:
        row = dict(contender=n, step_ms=1e3 * med[n], images_per_s=args.batch / med[n],
                   vs_cmd=med[n] / med["cmd"] if "cmd" in med else None,
                   vs_backbone=med[n] / med["backbone"] if "backbone" in med else None,
                   cpu_ms=1e3 * cpu_med[n], cpu_vs_cmd=cpu_med[n] / cpu_med["cmd"] if "cmd" in med else None,
                   peak_mib=peaks[n] / 2**20, first_step_s=first_step_s[n], runs_ms=[1e3 * t for t in times[n]])
        if flops:
            row["tflop_per_step"] = flops[n] / 1e12
            row["fraction_of_bf16_peak"] = flops[n] / med[n] / matmul_peak
        rows.append(row)
    if "cmd" in med and "loop" in med:
        paired = statistics.median(a / b for a, b in zip(times["cmd"], times["loop"]))
        print(f"cmd / loop: {med['cmd'] / med['loop']:.3f} (ratio of medians), {paired:.3f} (median of per-round "
              f"ratios), {cpu_med['cmd'] / cpu_med['loop']:.3f} (process CPU time)")

    profiles = {}
    if args.profile:
        for n in ("cmd", "cmd-fused", "loop"):
            if n in contenders:
                profiles[n] = profile_steps(contenders[n], steps=max(1, min(3, args.repeats)), top=args.profile_top)

    setting = (f"{args.arch} {args.backbone_kwargs or ''} B={args.batch} 2x{args.global_size}+{args.local_crops}x"
               f"{args.local_size} K={args.out_dim} head {args.hidden_dim}/{args.bottleneck_dim} "
               f"{'bf16' if args.amp else 'fp32'}{' compiled' if args.compile else ''}"
               f"{' channels-last' if args.channels_last else ''}")
    print(setting)
    header = (f"{'contender':10} {'step ms':>9} {'img/s':>8} {'x cmd':>6} {'x backbone':>10} {'cpu ms':>8} "
              f"{'cpu x cmd':>9} {'peak MiB':>9} {'1st step s':>10}")
    if flops:
        header += f" {'TFLOP':>7} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['contender']:10} {r['step_ms']:9.1f} {r['images_per_s']:8.1f} "
                f"{r['vs_cmd'] if r['vs_cmd'] is not None else float('nan'):6.2f} "
                f"{r['vs_backbone'] if r['vs_backbone'] is not None else float('nan'):10.2f} "
                f"{r['cpu_ms']:8.1f} {r['cpu_vs_cmd'] if r['cpu_vs_cmd'] is not None else float('nan'):9.2f} "
                f"{r['peak_mib']:9.1f} {r['first_step_s']:10.2f}")
        if flops:
            line += f" {r['tflop_per_step']:7.3f} {100 * r['fraction_of_bf16_peak']:6.1f}%"
        print(line)
    for n, prof in profiles.items():
        print(f"\nprofile of {n} (self time per step, by op)")
        for e in prof:
            print(f"  {e['op'][:48]:48} {e['self_ms']:8.2f} ms {100 * e['share']:5.1f}%  x{e['calls']}")

    meta = dict(setting=setting, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                cmd=getattr(cmd, "__version__", None), bf16_matmul_peak_tflops=(matmul_peak or 0) / 1e12 or None,
                memory=("cuda max_memory_allocated above the step's start" if device.type == "cuda"
                        else "peak bytes of tensor storages alive during one step (TorchDispatchMode)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows, profiles=profiles), indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
