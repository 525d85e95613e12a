"""CMD against the DINO and EsViT presets (and CMD's mean against gated-attention pooling), at equal budget.

Every contender is trained by the pretraining program (``python -m cmd pretrain``, a subprocess
per run) from the same seeds, with the same data, crops, backbone, heads and schedule;
only ``--loss`` (and, for ``cmd-mean``, ``--mil_pooling mean``) differ. ``cmd-sinkhorn`` (DINOv2's
Sinkhorn-Knopp normalisation of the teacher instead of centering) and ``cmd-koleo`` (the KoLeo term,
weight 0.1) measure the anti-collapse alternatives on the cmd preset. Each (contender, seed) run
reports, for the teacher:

- k-NN top-1 (%) before and after training (train split as memory, test split as queries);
- retrieval mAP@100 (%) of its pooled features, test images as queries against the train images
  (`cmd.retrieval_metrics`);
- the multi-instance weight mass on the discriminative part of the synthetic test images
  (`cmd.part_weight_mass`) against the uniform share (the fraction of tokens that overlap the part).
  Under "dino" and "esvit" no term trains the MIL pooling: their mass shows an untrained pooling;
- the collapse signals: the last epoch's mean teacher entropy H(P_t) and batch-mean entropy
  H(mean P_t), against log K, and the collapse the program diagnosed, if any;
- the training time.

The table gives the mean and the spread (sample standard deviation) over the seeds.

Settings: ``--setting demo`` is the program's defaults (the README's demo); ``--setting hard`` adds
``--synthetic_difficulty hard`` and a longer budget (``--epochs``, default 3x the program's).
This is a benchmark, not a test: report whichever way it comes out::

    python benchmarks/compare_presets.py --setting demo --seeds 3
    python benchmarks/compare_presets.py --setting hard --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

import cmd
from cmd import training
from cmd.checkpoint import read_checkpoint

CONTENDERS: dict[str, list[str]] = {
    "dino": ["--loss", "dino"],
    "esvit": ["--loss", "esvit"],
    "cmd": ["--loss", "cmd", "--mil_pooling", "gated_attention"],
    "cmd-mean": ["--loss", "cmd", "--mil_pooling", "mean"],
    # the anti-collapse alternatives to DINO's centering, on the cmd preset
    "cmd-sinkhorn": ["--loss", "cmd", "--mil_pooling", "gated_attention", "--centering", "sinkhorn"],
    "cmd-koleo": ["--loss", "cmd", "--mil_pooling", "gated_attention", "--koleo_weight", "0.1"],
}
DEFAULT_CONTENDERS = ("dino", "esvit", "cmd", "cmd-mean")  # the method comparison; the others on request
METRICS = ("knn_before", "knn_after", "map100", "part_mass", "uniform_mass", "teacher_entropy",
           "teacher_batch_entropy", "train_time_s")
# --smoke: a few steps on tiny data (the smoke test of tests/test_benchmarks_smoke.py)
SMOKE = ["--synthetic_classes", "4", "--synthetic_per_class", "8", "--synthetic_image_size", "32",
         "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--out_dim", "64",
         "--batch_size_per_gpu", "8", "--warmup_epochs", "1", "--knn_k", "5", "--num_workers", "0",
         "--arch", "vit_tiny", "--backbone_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}']


def _default(option: str):
    """The demo recipe's value of ``option`` (the program's default on synthetic data)."""
    return getattr(cmd.recipes.get("demo"), option)


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def _pretrain(argv: list[str]) -> None:
    """``python -m cmd pretrain ARGV`` with this checkout's ``cmd`` first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(cmd.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "cmd", "pretrain", *argv], env=env)
    if proc.returncode != 0:
        raise SystemExit(f"cmd-fgvc pretrain {' '.join(argv)}: exit status {proc.returncode}")


def _eval_data(args: SimpleNamespace, split: str, **kw):
    return training.build_data(args, split, cmd.eval_transform(args.eval_size or args.global_size), **kw)


def _teacher(args: SimpleNamespace, out_dir: Path) -> cmd.CMDNetwork:
    """The trained teacher; "dino" / "esvit" runs hold no MIL pooling: a freshly initialised one is used."""
    net = training.build_network(args)
    state = read_checkpoint(out_dir / "checkpoint.pth")["teacher"]
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("head.pooling.", "head.region_head.")) for k in missing):
        raise RuntimeError(f"checkpoint does not fit the network: missing {missing}, unexpected {unexpected}")
    return net.eval()


@torch.no_grad()
def part_mass(net: cmd.CMDNetwork, args: argparse.Namespace) -> tuple[float, float]:
    """Mean MIL weight mass on the part and the uniform share, over the synthetic test split."""
    masses, uniform = [], []
    data = _eval_data(args, "test", return_part_mask=True)
    for images, _labels, masks in DataLoader(data, batch_size=64):
        feats = net.backbone(images)
        out = net.head(feats.tokens, feats.pooled)
        n_tokens = feats.grid[0] * feats.grid[1]
        masses.append(cmd.part_weight_mass(out.mil_weights, masks, feats.grid))
        uniform.append(cmd.part_weight_mass(torch.full((len(images), n_tokens), 1.0 / n_tokens), masks, feats.grid))
    return float(torch.cat(masses).mean()), float(torch.cat(uniform).mean())


@torch.no_grad()
def map_at_100(net: cmd.CMDNetwork, args: argparse.Namespace) -> float:
    """Retrieval mAP@100 (%) of the teacher's pooled features: test queries against the train gallery."""
    feats = {}
    for split in ("train", "test"):
        loader = DataLoader(_eval_data(args, split), batch_size=64)
        feats[split] = cmd.extract_features(net.backbone, loader, device="cpu", progress=False)
    (gallery, gallery_y), (query, query_y) = feats["train"], feats["test"]
    metrics = cmd.retrieval_metrics(query, query_y, gallery, gallery_y, map_at=100, full_map=False, backend="torch")
    return float(metrics["mAP@100"])


def run_one(name: str, seed: int, base: list[str], work_dir: Path) -> dict:
    """Train and measure one (contender, seed); a finished run with the same options is read back, not redone.

    The row is cached in ``WORK_DIR/NAME_seedS/compare_row.json`` with the options that made it, so
    several processes can each run some contenders (``--contenders``) and a last call with all of them
    prints the whole table without training again.
    """
    out_dir = work_dir / f"{name}_seed{seed}"
    argv = [*base, *CONTENDERS[name], "--seed", str(seed), "--output_dir", str(out_dir), "--no_progress"]
    cache = out_dir / "compare_row.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("argv") == argv:
            return cached["row"]
        raise SystemExit(f"{out_dir} holds a run with other options ({cached.get('argv')}); "
                         "remove it or choose another --work_dir")
    t0 = time.perf_counter()
    _pretrain(argv)
    elapsed = time.perf_counter() - t0
    args = SimpleNamespace(**read_checkpoint(out_dir / "checkpoint.pth")["args"])  # the run's resolved options
    net = _teacher(args, out_dir)
    mass, uniform = part_mass(net, args)
    epochs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    last = epochs[-1]
    row = {
        "contender": name, "seed": seed, "knn_before": epochs[0].get("knn_top1_before"),
        "knn_after": last["knn_top1"], "map100": map_at_100(net, args), "part_mass": mass, "uniform_mass": uniform,
        "teacher_entropy": last.get("teacher_entropy"), "teacher_batch_entropy": last.get("teacher_batch_entropy"),
        "log_k": math.log(args.out_dim), "collapse": sorted({e["collapse"] for e in epochs if e.get("collapse")}),
        "train_time_s": elapsed,
    }
    _write_json_atomic(cache, {"argv": argv, "row": row})
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per contender: mean and sample standard deviation (0 for one seed) of every metric."""
    table = []
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = [r for r in rows if r["contender"] == name]
        entry = {"contender": name, "seeds": len(mine), "log_k": mine[0]["log_k"],
                 "collapses": sorted({c for r in mine for c in r["collapse"]})}
        for metric in METRICS:
            values = [r[metric] for r in mine if r[metric] is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def _cell(entry: dict, metric: str, fmt: str) -> str:
    if entry[metric] is None:
        return "-"
    return f"{entry[metric]:{fmt}} ± {entry[f'{metric}_std']:{fmt}}"


def print_table(table: list[dict], header: str) -> None:
    print(f"\n{header}")
    cols = [("k-NN before", "knn_before", ".2f"), ("k-NN after", "knn_after", ".2f"), ("mAP@100", "map100", ".2f"),
            ("part mass", "part_mass", ".3f"), ("uniform", "uniform_mass", ".3f"),
            ("H(P_t)", "teacher_entropy", ".2f"), ("H(mean P_t)", "teacher_batch_entropy", ".2f"),
            ("time (s)", "train_time_s", ".0f")]
    print(" | ".join(["contender", *(c[0] for c in cols), "log K", "collapse"]))
    for e in table:
        cells = [_cell(e, m, f) for _, m, f in cols]
        print(" | ".join([e["contender"], *cells, f"{e['log_k']:.2f}", ",".join(e["collapses"]) or "none"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", choices=["demo", "hard"], default="demo",
                        help="demo: the program's defaults; hard: --synthetic_difficulty hard, longer budget")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                        help="what to compare (cmd-sinkhorn and cmd-koleo: the anti-collapse alternatives)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per contender")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the program's for demo, 3x that for hard)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and network (the CI smoke test)")
    parser.add_argument("--work_dir", default="outputs/compare_presets", help="where the runs are written")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/compare_presets_SETTING.json)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further options of the pretraining program (after --extra)")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    epochs = opts.epochs or _default("epochs") * (3 if opts.setting == "hard" else 1)
    base = [*(SMOKE if opts.smoke else []), "--epochs", str(epochs)]
    if opts.setting == "hard":
        base += ["--synthetic_difficulty", "hard"]
    base += opts.extra
    work_dir = Path(opts.work_dir) / opts.setting
    rows = [run_one(name, seed, base, work_dir) for name in opts.contenders for seed in range(opts.seeds)]
    table = summarise(rows)
    header = (f"synthetic fine-grained data, setting {opts.setting}, {epochs} epochs, {opts.seeds} seed(s) "
              f"(mean ± std); options {' '.join(base)}")
    print_table(table, header)
    payload = {"setting": opts.setting, "epochs": epochs, "seeds": opts.seeds, "options": base, "table": table,
               "runs": rows, "torch": torch.__version__, "cmd": cmd.__version__,
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out = Path(opts.out or f"benchmarks/results/compare_presets_{opts.setting}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))
    print(f"written to {out}")
    return payload


if __name__ == "__main__":
    main()
