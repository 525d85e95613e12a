"""Benchmark: `CMDLoss` (presets "esvit" and "cmd") against a per-pair loop, forward + backward, at K = 4096 and 65536.

Contenders compute the same loss from the same inputs (``--contenders``; the loop always runs):

- ``loop``: the obvious implementation (EsViT's per-pair loop, plus a per-crop loop for the CMD
  inter-level term): for every pair (g, v != g) a log-softmax of the student's image and region
  logits, a gather of the matched teacher regions and a cross-entropy; the reference of every ratio;
- ``CMDLoss``: the library's default path (the region terms chunked, their gradient formed in the
  forward pass: `cmd.losses.fused.region_cross_entropy`);
- ``aggregated`` (opt-in): the same in plain autograd with the targets of each student crop summed over
  the teachers g != v first, written here independently: what the aggregation alone buys;
- ``fused`` (opt-in): ``CMDLoss(fused_chunk_size=8)``, the prototype layer inside the chunked region
  terms (`cmd.losses.fused.fused_prototype_cross_entropy`).

``--prototypes inside``: the student's region logits come from its prototype layer, ``region =
region_embedding @ prototypes^T`` (bottleneck 256), inside every timed call (forward and backward of
the product, common to all contenders); ``outside``: the region logits are given (leaf tensors) and
the loss alone is timed. Both by default, so that a regression of the loss shows in the second.

Rounds alternate the contenders (a rotating order), one preset after the other. Reported per
contender: the median wall time, ``x loop`` (ratio of the medians), the median and the range of the
per-round ratios to the loop (the same round: side by side under the machine's load of the moment),
and the peak memory.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs. On the CPU, a
``TorchDispatchMode`` sees every tensor that an operator (forward, backward, and inside custom autograd
functions) returns, tracks each new storage until it is freed (weak references) and reports the
largest number of bytes alive at once above the inputs: what torch allocated for the step, without the
allocator's own overhead. It runs in a separate, untimed pass.

Usage::

    python benchmarks/bench_losses.py --threads 2                  # K = 4096 and 65536, protos inside + outside
    python benchmarks/bench_losses.py --out-dims 4096 --contenders loop aggregated CMDLoss fused --threads 1
    python benchmarks/bench_losses.py --device cuda --gpu-dtype bfloat16   # + the GPU setting (K = 65536, B = 64)

CPU setting: B = 8, Swin-T token counts 49 / 9, 2 + 8 crops, bottleneck 256. Logits are
``logit_scale * N(0, 1)`` (``--logit-scales``, default 0.3: cosine-like logits of a weight-normalised
head); at 1.0 a temperature-0.04 teacher softmax underflows to sub-normal numbers for about a quarter
of K, which costs the CPU much time in every op that touches them (CMDLoss flushes them to 0 once).
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
class _BaselineLoss:
    """State shared by the two baselines: centers, crop counts, weights, temperatures."""

    def __init__(self, out_dim: int, n_global: int, n_crops: int, *, image_weight: float, region_weight: float,
                 inter_weight: float, device: torch.device) -> None:
        self.center = torch.zeros(1, out_dim, device=device)
        self.region_center = torch.zeros(1, out_dim, device=device)
        self.G, self.V = n_global, n_crops
        self.wi, self.wr, self.ws = image_weight, region_weight, inter_weight
        self.tau_s, self.m = 0.1, 0.9


class PerPairLoopLoss(_BaselineLoss):
    """The straightforward implementation: loops over pairs (I, R) and crops (S), as EsViT's code does."""

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


class AggregatedAutogradLoss(_BaselineLoss):
    """The same loss in plain autograd with aggregated targets: ``T_v = sum_{g != v} P_g`` per student crop."""

    def __call__(self, student: list[CrossLevelOutput], teacher: CrossLevelOutput, tau_t: float) -> torch.Tensor:
        G, V, B, K = self.G, self.V, teacher.image.shape[0] // self.G, teacher.image.shape[1]
        n_pairs = G * (V - 1)
        with torch.no_grad():
            p = F.softmax((teacher.image.float() - self.center) / tau_t, dim=-1).view(G, B, K)
            q = F.softmax((teacher.region.float() - self.region_center) / tau_t, dim=-1).view(G, B, -1, K)
            t_unit = F.normalize(teacher.tokens.float(), dim=-1).view(G, B, -1, teacher.tokens.shape[-1])
            own = torch.eye(G, V, device=p.device)  # own[g, v] = 1 where v is teacher crop g's own view
            image_target = torch.einsum("gv,gbk->vbk", 1 - own, p)  # sum over g != v
        log_p = F.log_softmax(torch.cat([o.image for o in student]).float() / self.tau_s, dim=-1).view(V, B, K)
        total = self.wi * -(image_target * log_p).sum() / (B * n_pairs)
        first, inter = 0, 0.0
        for o in student:
            c, n = o.image.shape[0] // B, o.region.shape[1]
            log_q = F.log_softmax(o.region.float() / self.tau_s, dim=-1).view(c, B, n, K)
            with torch.no_grad():
                s_unit = F.normalize(o.tokens.float(), dim=-1).view(c, B, n, -1)
                match = torch.einsum("cbnd,gbmd->cbngm", s_unit, t_unit).argmax(-1)  # [C, B, N, G]
                target = torch.zeros_like(log_q)
                for g in range(G):
                    gathered = torch.gather(q[g].unsqueeze(0).expand(c, -1, -1, -1), 2,
                                            match[..., g].unsqueeze(-1).expand(-1, -1, -1, K))
                    target += (1 - own[g, first : first + c]).view(c, 1, 1, 1) * gathered
            total = total + self.wr * -(target * log_q).sum() / (B * n * n_pairs)
            if self.ws > 0:
                w = o.mil_weights.float().view(c, B, n)
                log_b = torch.logsumexp(log_q + w.clamp_min(torch.finfo(torch.float32).tiny).log().unsqueeze(-1), 2)
                inter = inter + (log_b.exp() * (log_b - log_p[first : first + c])).sum() / (V * B)
            first += c
        total = total + self.ws * inter
        with torch.no_grad():
            self.center = self.center * self.m + teacher.image.float().mean(0, keepdim=True) * (1 - self.m)
            flat = teacher.region.float().reshape(-1, K)
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
BOTTLENECK = 256


def make_inputs(batch, out_dim, tokens, n_global, n_local, dim, scale, device, dtype, seed=0):
    """Student groups with ``region_embedding`` (unit rows) and shared ``prototypes`` (scaled so that the
    region logits are ``scale * N(0, 1)``-like), the teacher with region logits."""
    g = torch.Generator(device=device).manual_seed(seed)
    prototypes = (torch.randn(out_dim, BOTTLENECK, generator=g, device=device) * scale).to(dtype).requires_grad_()

    def group(crops, n, student):
        rows = crops * batch
        image = (torch.randn(rows, out_dim, generator=g, device=device) * scale).to(dtype)
        region = None if student else (torch.randn(rows, n, out_dim, generator=g, device=device) * scale).to(dtype)
        tokens = torch.randn(rows, n, dim, generator=g, device=device)
        weights = torch.softmax(torch.randn(rows, n, generator=g, device=device), -1)
        if not student:
            return CrossLevelOutput(image, region, tokens, weights)
        emb = F.normalize(torch.randn(rows, n, BOTTLENECK, generator=g, device=device), dim=-1).to(dtype)
        return CrossLevelOutput(image.requires_grad_(), None, tokens, weights.requires_grad_(),
                                emb.requires_grad_(), prototypes=prototypes)

    student = [group(n_global, tokens[0], True), group(n_local, tokens[1], True)]
    teacher = group(n_global, tokens[0], False)
    return student, teacher


def with_region_logits(student):
    """The plain contenders' inputs: the region logits from the prototype layer (differentiable)."""
    return [CrossLevelOutput(o.image, o.region_embedding @ o.prototypes.t(), o.tokens, o.mil_weights)
            for o in student]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _zero_grads(student):
    for o in student:
        for t in (o.image, o.region_embedding, o.mil_weights, o.prototypes):
            t.grad = None


NAMES = ("loop", "aggregated", "CMDLoss", "fused")


def _zero_all(student, plain):
    _zero_grads(student)
    for o in plain:
        o.region.grad = None


def run_setting(name_, *, batch, out_dim, tokens, dim, scale, device, dtype, repeats, warmup, presets=PRESETS,
                names=NAMES, prototypes_inside=True):
    """Times of ``names`` for each preset; ``prototypes_inside``: the prototype layer inside the timed call."""
    n_global, n_local = 2, 8
    student, teacher = make_inputs(batch, out_dim, tokens, n_global, n_local, dim, scale, device, dtype)
    # without the prototype layer: the region logits are given (leaf tensors), the loss alone is timed
    plain = [CrossLevelOutput(o.image, (o.region_embedding @ o.prototypes.t()).detach().requires_grad_(), o.tokens,
                              o.mil_weights) for o in student]
    names = tuple(n for n in names if prototypes_inside or n != "fused")  # fused holds the prototype layer
    inputs = (lambda: with_region_logits(student)) if prototypes_inside else (lambda: plain)
    tau_t = 0.04
    contenders = {}
    for preset in presets:
        weights = {k: v for k, v in CMDLoss.PRESETS[preset].items() if k != "swapped_weight"}
        loop = PerPairLoopLoss(out_dim, n_global, n_global + n_local, device=device, **weights)
        agg = AggregatedAutogradLoss(out_dim, n_global, n_global + n_local, device=device, **weights)
        ours = CMDLoss.from_preset(preset, out_dim=out_dim, n_local_crops=n_local).to(device)
        fused = CMDLoss.from_preset(preset, out_dim=out_dim, n_local_crops=n_local, fused_chunk_size=8).to(device)
        # the teacher output holds what the program's teacher computes for this loss (`teacher_outputs`):
        # without the bag terms, no MIL weights (and no teacher-bag diagnostic)
        t_in = CrossLevelOutput(**{f: getattr(teacher, f) if f in ours.teacher_outputs else None
                                   for f in ("image", "region", "tokens", "mil_weights")})
        contenders[("loop", preset)] = lambda f=loop: f(inputs(), teacher, tau_t)
        contenders[("aggregated", preset)] = lambda f=agg: f(inputs(), teacher, tau_t)
        contenders[("CMDLoss", preset)] = lambda f=ours, t=t_in: f(inputs(), t, teacher_temp=tau_t).loss
        contenders[("fused", preset)] = lambda f=fused, t=t_in: f(student, t, teacher_temp=tau_t).loss
    contenders = {k: f for k, f in contenders.items() if k[0] in names}

    # same values (centers move identically in all)
    for preset in presets:
        values = {name: float(contenders[(name, preset)]().detach()) for name in names}
        if max(values.values()) - min(values.values()) > 1e-3 * abs(values["loop"]) + 1e-4:
            raise RuntimeError(f"{preset}: the contenders disagree: {values}")

    # Rounds: a preset's contenders run back to back in a rotating order, so that they share the
    # machine's load of the moment (the machine may be shared and noisy).
    times = {k: [] for k in contenders}
    for preset in presets:  # one preset after the other, as a training run calls one loss repeatedly
        for r in range(warmup + repeats):
            for i in range(len(names)):
                key = (names[(i + r) % len(names)], preset)
                _zero_all(student, plain)
                _sync(device)
                t0 = time.perf_counter()
                contenders[key]().backward()
                _sync(device)
                if r >= warmup:
                    times[key].append(time.perf_counter() - t0)

    peaks = {}
    for key, fn in contenders.items():
        _zero_all(student, plain)
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
    _zero_all(student, plain)

    rows = []
    for preset in presets:
        loop_runs = times[("loop", preset)]
        loop_ms = 1e3 * statistics.median(loop_runs)
        for name in names:
            runs = times[(name, preset)]
            ms = 1e3 * statistics.median(runs)
            pairs = sorted(t / lt for t, lt in zip(runs, loop_runs))  # the same round: side by side
            rows.append(dict(setting=name_, preset=preset, contender=name, prototypes_inside=prototypes_inside,
                             ms=ms, time_vs_loop=ms / loop_ms, pair_ratio_median=statistics.median(pairs),
                             pair_ratio_min=pairs[0], pair_ratio_max=pairs[-1],
                             peak_mib=peaks[(name, preset)] / 2**20,
                             memory_vs_loop=peaks[(name, preset)] / peaks[("loop", preset)],
                             runs_ms=[1e3 * t for t in runs], pair_ratios=pairs))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the CPU settings, and the GPU setting too when CUDA is available")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out-dims", type=int, nargs="+", default=[4096, 65536], help="K of the CPU settings")
    parser.add_argument("--logit-scales", type=float, nargs="+", default=[0.3])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--contenders", nargs="+", default=["loop", "CMDLoss"], choices=NAMES,
                        help="the loop always runs (the reference of every ratio)")
    parser.add_argument("--prototypes", nargs="+", default=["inside", "outside"], choices=["inside", "outside"],
                        help="the prototype layer inside the timed call, or the region logits given")
    parser.add_argument("--gpu-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = tuple(n for n in NAMES if n == "loop" or n in args.contenders)

    settings = []
    if args.device in ("auto", "cpu"):
        for k in args.out_dims:
            for scale in args.logit_scales:
                settings.append((f"cpu K={k} B=8 s={scale}", dict(batch=8, out_dim=k, tokens=(49, 9), dim=768,
                                 scale=scale, device=torch.device("cpu"), dtype=torch.float32)))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        dtype = getattr(torch, args.gpu_dtype)
        for scale in args.logit_scales:
            settings.append((f"cuda K=65536 B=64 {args.gpu_dtype} s={scale}",
                             dict(batch=64, out_dim=65536, tokens=(49, 9), dim=768, scale=scale,
                                  device=torch.device("cuda"), dtype=dtype)))

    rows = []
    for name, kw in settings:
        for where in args.prototypes:
            rows += run_setting(name, repeats=args.repeats, warmup=args.warmup, presets=args.presets, names=names,
                                prototypes_inside=where == "inside", **kw)

    header = (f"{'setting':26} {'protos':7} {'preset':6} {'contender':10} {'ms':>8} {'x loop':>6} {'pairs: median':>13} "
              f"{'[min, max]':>12} {'peak MiB':>9} {'mem x loop':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        where = "inside" if r["prototypes_inside"] else "outside"
        print(f"{r['setting']:26} {where:7} {r['preset']:6} {r['contender']:10} {r['ms']:8.1f} {r['time_vs_loop']:6.2f} "
              f"{r['pair_ratio_median']:13.2f} [{r['pair_ratio_min']:4.2f}, {r['pair_ratio_max']:4.2f}] "
              f"{r['peak_mib']:9.1f} {r['memory_vs_loop']:10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
