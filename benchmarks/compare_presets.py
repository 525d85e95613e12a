"""CMD against the DINO and EsViT presets at equal budget, with paired per-seed differences and 95 % intervals.

Every contender is trained by the pretraining program (``python -m cmd pretrain``, a subprocess
per run) from the same seeds, with the same data, crops, backbone, heads and schedule;
only ``--loss`` (and, for ``cmd-mean``, ``--mil_pooling mean``) differ. ``cmd-sinkhorn`` (DINOv2's
Sinkhorn-Knopp normalisation of the teacher instead of centering) and ``cmd-koleo`` (the KoLeo term,
weight 0.1) measure the anti-collapse alternatives on the cmd preset. Two references come with them:

- ``random-init``: the teacher's k-NN before training (the same initial weights for every contender
  of a seed; measured by every run, and checked to agree);
- ``supervised`` (a contender of its own, run in this process): the same backbone from the same
  initial weights trained with labels for as many steps, with the same lr schedule and one global
  crop of the same augmentation (``cmd-fgvc pretrain --supervised_reference``'s procedure), then the
  same k-NN. What labels reach in the budget: the ceiling a self-supervised gain is read against.

Each (contender, seed) run reports, for the teacher:

- k-NN top-1 (%) before and after training (train split as memory, test split as queries), and the
  gain (after - before);
- retrieval mAP@100 (%) of its pooled features, test images as queries against the train images
  (`cmd.retrieval_metrics`);
- on synthetic data, the multi-instance weight mass on the discriminative part of the test images
  (`cmd.part_weight_mass`) against the uniform share (the fraction of tokens that overlap the part).
  Under "dino" and "esvit" no term trains the MIL pooling: their mass shows an untrained pooling;
- the collapse signals: the last epoch's mean teacher entropy H(P_t) and batch-mean entropy
  H(mean P_t), against log K, and the collapse the program diagnosed, if any;
- the training time.

Two tables: per contender the mean and sample standard deviation over the seeds; per pair of
contenders (and each contender against the references) the difference *per seed* of the final
k-NN and of the gain, their mean, a 95 % Student-t interval (n - 1 degrees of freedom) and a
seeded percentile bootstrap of the mean (``paired_stats.py``). Pairing is sound only if the
contenders of a seed saw the same data and started from the same weights: every run records a
SHA-256 of its train and test images and labels and of its initial backbone (built as the program
builds it), and the table is refused when they, or the k-NN before training the program measured,
differ within a seed.

Settings (``--setting``): ``demo`` (the program's defaults, the README's demo), ``hard``
(``--synthetic_difficulty hard``, 3x the epochs), ``medium`` (``--synthetic_difficulty medium``
with ``--lr 0.016``, 2x the epochs: the part is necessary, a random-init k-NN near chance, and
labels reach >= 90 % in the budget) and ``digits`` (``--dataset
digits``: scikit-learn's 8 x 8 handwritten digits at 32 px, real images that need no download).
This is a benchmark, not a test: report whichever way it comes out::

    python benchmarks/compare_presets.py --setting digits                  # 5 seeds, dino esvit cmd supervised
    python benchmarks/compare_presets.py --setting digits --contenders dino --seeds 5   # one lane per process ...
    python benchmarks/compare_presets.py --setting digits --no_train      # ... then assemble the table

Each run is cached in ``WORK_DIR/SETTING/NAME_seedS/compare_row.json`` (written atomically, with the
options that made it): lanes can run in separate processes and a later call assembles the table.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired_stats import paired_difference  # noqa: E402

CONTENDERS: dict[str, list[str]] = {
    "dino": ["--loss", "dino"],
    "esvit": ["--loss", "esvit"],
    "cmd": ["--loss", "cmd", "--mil_pooling", "gated_attention"],
    "cmd-mean": ["--loss", "cmd", "--mil_pooling", "mean"],
    # the anti-collapse alternatives to DINO's centering, on the cmd preset
    "cmd-sinkhorn": ["--loss", "cmd", "--mil_pooling", "gated_attention", "--centering", "sinkhorn"],
    "cmd-koleo": ["--loss", "cmd", "--mil_pooling", "gated_attention", "--koleo_weight", "0.1"],
}
SUPERVISED = "supervised"  # the reference trained with labels (in this process), a contender of its own
RANDOM_INIT = "random-init"  # the teacher before training (k-NN before; gain 0): a reference of every seed
DEFAULT_CONTENDERS = ("dino", "esvit", "cmd", SUPERVISED)  # the method comparison; the others on request
METRICS = ("knn_before", "knn_after", "gain", "map100", "part_mass", "uniform_mass", "pointing", "iou", "iou_chance",
           "teacher_entropy", "teacher_batch_entropy", "rankme", "train_time_s")
PAIRED_METRICS = ("knn_after", "gain")
# setting -> (options of the program, epochs as a multiple of the demo recipe's)
SETTINGS: dict[str, tuple[list[str], int]] = {
    "demo": ([], 1),
    "hard": (["--synthetic_difficulty", "hard"], 3),
    # lr 1.6e-2 at 256 (2e-3 at the batch of 32): with the demo's 4e-3 labels reach only 78 % in the 620 steps
    "medium": (["--synthetic_difficulty", "medium", "--lr", "0.016"], 2),
    "digits": (["--dataset", "digits"], 1),
}
# --smoke: a few steps on tiny data (the smoke test of tests/test_benchmarks_smoke.py)
SMOKE = ["--synthetic_classes", "4", "--synthetic_per_class", "8", "--synthetic_image_size", "32",
         "--global_size", "32", "--local_size", "16", "--local_crops_number", "2", "--out_dim", "64",
         "--batch_size_per_gpu", "8", "--warmup_epochs", "1", "--knn_k", "5", "--num_workers", "0",
         "--arch", "vit_tiny", "--backbone_kwargs", '{"depth": 2, "patch_size": 8, "embed_dim": 48, "num_heads": 3}']


def _default(option: str):
    """The demo recipe's value of ``option`` (the program's default on synthetic data)."""
    return getattr(cmd.recipes.get("demo"), option)


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
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


def _teacher(args: SimpleNamespace, state: dict) -> cmd.CMDNetwork:
    """The trained teacher from its checkpoint's ``teacher`` state; "dino" / "esvit" runs hold no MIL pooling:
    a freshly initialised one is used."""
    net = training.build_network(args)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("head.pooling.", "head.region_head.")) for k in missing):
        raise RuntimeError(f"checkpoint does not fit the network: missing {missing}, unexpected {unexpected}")
    return net.eval()


def data_fingerprint(args) -> str:
    """SHA-256 of the run's train and test images (raw pixels, before any transform) and labels."""
    digest = hashlib.sha256()
    for split in ("train", "test"):
        data = training.build_data(args, split)
        for i in range(len(data)):
            image, label = data[i][:2]
            digest.update(f"{split}:{i}:{int(label)}:{image.size}:".encode())
            digest.update(image.tobytes())
    return digest.hexdigest()


def init_fingerprint(args) -> str:
    """SHA-256 of the initial backbone weights, built as ``cmd-fgvc pretrain`` builds the student.

    The program seeds with ``--seed``, builds the loss, then the network (backbone first); the
    backbone is what the k-NN reads and what every contender of a seed must share.
    """
    torch.manual_seed(args.seed)
    criterion = training.build_loss(args)
    net = training.build_network(args, outputs=criterion.student_outputs)
    digest = hashlib.sha256()
    for name, tensor in sorted(net.backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


LOCALISATION = ("part_mass", "uniform_mass", "pointing", "iou", "iou_chance")


@torch.no_grad()
def part_localisation(net: cmd.CMDNetwork, args) -> dict[str, float | None]:
    """Over the synthetic test split (None otherwise): the mean MIL weight mass on the part and the uniform share
    (`cmd.part_weight_mass`), the pointing game (`cmd.pointing_game`; chance: the uniform share) and the IoU of the
    top-k tokens with the part's k tokens and its chance level (`cmd.top_k_part_iou`)."""
    if args.dataset != "synthetic":
        return dict.fromkeys(LOCALISATION)
    weights, masks, grid = mil_weights_on_test_split(net, args)
    n_tokens = grid[0] * grid[1]
    iou, chance = cmd.top_k_part_iou(weights, masks, grid)
    parts = {"part_mass": cmd.part_weight_mass(weights, masks, grid),
             "uniform_mass": cmd.part_weight_mass(torch.full_like(weights, 1.0 / n_tokens), masks, grid),
             "pointing": cmd.pointing_game(weights, masks, grid), "iou": iou, "iou_chance": chance}
    return {name: float(values.mean()) for name, values in parts.items()}


@torch.no_grad()
def mil_weights_on_test_split(net: cmd.CMDNetwork, args, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """The teacher's MIL weights [B, N] over the synthetic test split, its part masks [B, H, W] and the grid (h, w)."""
    weights, masks, grid = [], [], None
    data = _eval_data(args, "test", return_part_mask=True)
    for images, _labels, part_masks in DataLoader(data, batch_size=batch_size):
        feats = net.backbone(images)
        weights.append(net.head(feats.tokens, feats.pooled).mil_weights)
        masks.append(part_masks)
        grid = tuple(int(g) for g in feats.grid)
    return torch.cat(weights), torch.cat(masks), grid


@torch.no_grad()
def map_at_100(backbone: torch.nn.Module, args) -> float:
    """Retrieval mAP@100 (%) of pooled features: test queries against the train gallery."""
    feats = {}
    for split in ("train", "test"):
        loader = DataLoader(_eval_data(args, split), batch_size=64)
        feats[split] = cmd.extract_features(backbone, loader, device="cpu", progress=False)
    (gallery, gallery_y), (query, query_y) = feats["train"], feats["test"]
    metrics = cmd.retrieval_metrics(query, query_y, gallery, gallery_y, map_at=100, full_map=False, backend="torch")
    return float(metrics["mAP@100"])


def read_epoch_log(out_dir: Path) -> list[dict]:
    """The per-epoch records of a finished run (its ``log.jsonl``), in order."""
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _cached(cache: Path, argv: list[str]) -> dict | None:
    if not cache.is_file():
        return None
    cached = json.loads(cache.read_text())
    if cached.get("argv") == argv:
        return cached["row"]
    raise SystemExit(f"{cache.parent} holds a run with other options ({cached.get('argv')}); "
                     "remove it or choose another --work_dir")


def _argv(name: str, seed: int, base: list[str], out_dir: Path) -> list[str]:
    return [*base, *CONTENDERS.get(name, []), "--seed", str(seed), "--output_dir", str(out_dir), "--no_progress"]


def run_one(name: str, seed: int, base: list[str], work_dir: Path, train: bool = True) -> dict | None:
    """Train and measure one (contender, seed); a finished run with the same options is read back, not redone.

    The row is cached in ``WORK_DIR/NAME_seedS/compare_row.json`` with the options that made it, so
    several processes can each run some contenders (``--contenders``) and a last call with all of them
    prints the whole table without training again. ``train=False``: None when it is not cached.
    """
    out_dir = work_dir / f"{name}_seed{seed}"
    argv = _argv(name, seed, base, out_dir)
    cache = out_dir / "compare_row.json"
    row = _cached(cache, argv)
    if row is not None or not train:
        return row
    if name == SUPERVISED:
        row = run_supervised(seed, argv, out_dir)
    else:
        row = run_self_supervised(name, seed, argv, out_dir)
    _write_json_atomic(cache, {"argv": argv, "row": row})
    return row


def run_self_supervised(name: str, seed: int, argv: list[str], out_dir: Path) -> dict:
    t0 = time.perf_counter()
    _pretrain(argv)
    elapsed = time.perf_counter() - t0
    checkpoint = read_checkpoint(out_dir / "checkpoint.pth")
    args = SimpleNamespace(**checkpoint["args"])  # the run's resolved options
    net = _teacher(args, checkpoint["teacher"])
    localisation = part_localisation(net, args)
    epochs = read_epoch_log(out_dir)
    last = epochs[-1]
    before, after = epochs[0].get("knn_top1_before"), last["knn_top1"]
    return {
        "contender": name, "seed": seed, "knn_before": before, "knn_after": after,
        "gain": None if before is None else after - before,
        "map100": map_at_100(net.backbone, args), **localisation,
        "teacher_entropy": last.get("teacher_entropy"), "teacher_batch_entropy": last.get("teacher_batch_entropy"),
        "rankme": last.get("rankme"),
        "log_k": math.log(args.out_dim), "collapse": sorted({e["collapse"] for e in epochs if e.get("collapse")}),
        "train_time_s": elapsed, "steps": last["step"],
        "data_sha256": data_fingerprint(args), "init_sha256": init_fingerprint(args),
    }


def resolved_options(argv: list[str]) -> SimpleNamespace:
    """The options ``cmd-fgvc pretrain ARGV`` would train with (its ``--print_config``, read back)."""
    import yaml

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(cmd.__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "cmd", "pretrain", *argv, "--print_config"], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cmd-fgvc pretrain {' '.join(argv)} --print_config: {proc.stderr.strip()}")
    return SimpleNamespace(**yaml.safe_load(proc.stdout))


@torch.no_grad()
def knn_top1(backbone: torch.nn.Module, args) -> float:
    """The program's k-NN monitor: pooled features, train split as memory, test split as queries, T = 0.07."""
    feats = [cmd.extract_features(backbone, DataLoader(_eval_data(args, split), batch_size=64), device="cpu",
                                  progress=False) for split in ("train", "test")]
    knn = cmd.KNNClassifier(k=(args.knn_k,), temperature=0.07, backend="torch")
    knn.fit(*feats[0])
    return float(knn.evaluate(*feats[1])[args.knn_k]["top1"])


class _OneCrop:
    """One global crop of the run's multi-crop augmentation, as a tensor [3, H, W]."""

    def __init__(self, args) -> None:
        self.augmentation = training.build_multicrop(args, n_global=1, n_local=0)

    def __call__(self, image):
        return self.augmentation(image)[0]


def run_supervised(seed: int, argv: list[str], out_dir: Path) -> dict:
    """The supervised reference of one seed, in this process (the procedure of ``--supervised_reference``).

    The options are the program's (``--print_config``); the backbone is built from the seed as the
    student's; the steps are the program's (``epochs`` x whole batches per epoch), with its lr
    schedule, on one global crop of its augmentation, then its k-NN. The backbone's k-NN before
    training is measured too (the random-init reference, which must equal every contender's).
    """
    args = resolved_options([a for a in argv if a not in ("--output_dir", str(out_dir))])
    train = training.build_data(args, "train")
    iters_per_epoch = training.build_train_loader(args, train, seed=args.seed).sampler.epoch_length \
        // args.batch_size_per_gpu
    steps = args.epochs * iters_per_epoch
    torch.manual_seed(args.seed)  # the student's initial weights
    before = knn_top1(training.build_network(args).backbone, args)
    # built again after the seed, as the program does: the k-NN's loaders drew from the global generator,
    # which the augmentations below (num_workers 0) use
    torch.manual_seed(args.seed)
    backbone = training.build_network(args).backbone
    data = training.build_data(args, "train", _OneCrop(args))
    loader = DataLoader(data, batch_size=args.batch_size_per_gpu, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    result = cmd.eval.train_supervised(
        backbone, loader, len(data.classes), steps=steps, lr=cmd.scale_lr(args.lr, args.batch_size_per_gpu),
        min_lr=args.min_lr, weight_decay=args.weight_decay,
        warmup_steps=min(args.warmup_epochs, args.epochs) * iters_per_epoch, device="cpu", seed=args.seed,
        progress=False)
    elapsed = time.perf_counter() - t0
    after = knn_top1(backbone, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"supervised reference, seed {seed}: {steps} steps with labels ({elapsed:.0f} s): k-NN top-1 "
          f"{before:.2f} -> {after:.2f} %")
    return {
        "contender": SUPERVISED, "seed": seed, "knn_before": before, "knn_after": after,
        "gain": after - before, "map100": map_at_100(backbone, args), **dict.fromkeys(LOCALISATION),
        "rankme": None, "teacher_entropy": None, "teacher_batch_entropy": None, "log_k": None, "collapse": [],
        "train_time_s": elapsed, "steps": result.steps, "train_top1": result.train_top1,
        "data_sha256": data_fingerprint(args), "init_sha256": init_fingerprint(args),
    }


def check_pairing(rows: list[dict]) -> list[str]:
    """What breaks the pairing: within a seed, other data, other initial weights or another k-NN before training.

    The k-NN before training is compared to 1e-4 points: the program logs it to 6 significant
    digits, and one query image more or less moves it by at least 1e-3 points up to 100,000 queries.
    """
    problems = []
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]
        for key, what in (("data_sha256", "data"), ("init_sha256", "initial backbone weights"),
                          ("knn_before", "k-NN before training")):
            values = {r["contender"]: r.get(key) for r in mine}
            if key == "knn_before" and None not in values.values():
                agree = max(values.values()) - min(values.values()) <= 1e-4
            else:
                agree = len(set(values.values())) == 1
            if not agree:
                problems.append(f"seed {seed}: other {what} across contenders: {values}")
    return problems


def summarise(rows: list[dict]) -> list[dict]:
    """Per contender: mean and sample standard deviation (0 for one seed) of every metric."""
    table = []
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = [r for r in rows if r["contender"] == name]
        entry = {"contender": name, "seeds": len(mine), "log_k": mine[0]["log_k"],
                 "collapses": sorted({c for r in mine for c in r["collapse"]})}
        for metric in METRICS:
            values = [r[metric] for r in mine if r.get(metric) is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(entry)
    return table


def paired(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per pair (a, b): the differences a - b per seed of each `PAIRED_METRICS`, mean, 95 % t and bootstrap CIs.

    Pairs: every two self-supervised contenders, the later (in the order given) minus the earlier
    (``cmd - dino``), then each of them against the references: ``random-init`` (its k-NN after
    minus the k-NN before: the gain) and ``supervised`` when it ran.
    """
    by = {(r["contender"], r["seed"]): r for r in rows}
    names = list(dict.fromkeys(r["contender"] for r in rows))
    learners = [n for n in names if n != SUPERVISED]
    pairs = [(b, a) for a, b in itertools.combinations(learners, 2)] + [(n, RANDOM_INIT) for n in learners]
    pairs += [(n, SUPERVISED) for n in learners if SUPERVISED in names]

    def values(name: str, metric: str) -> list[float]:
        if name == RANDOM_INIT:  # the teacher before training: k-NN before, gain 0
            ref = learners[0] if learners else SUPERVISED
            return [by[(ref, s)]["knn_before"] if metric == "knn_after" else 0.0 for s in seeds]
        return [by[(name, s)][metric] for s in seeds]

    out = []
    for a, b in pairs:
        for metric in PAIRED_METRICS:
            if (b == RANDOM_INIT and metric == "gain"):
                continue  # the same numbers as k-NN after minus before
            stats = paired_difference(values(a, metric), values(b, metric))
            out.append({"a": a, "b": b, "metric": metric, "seeds": seeds, **stats.as_dict()})
    return out


def _cell(entry: dict, metric: str, fmt: str) -> str:
    if entry[metric] is None:
        return "-"
    return f"{entry[metric]:{fmt}} ± {entry[f'{metric}_std']:{fmt}}"


def print_table(table: list[dict], header: str) -> None:
    print(f"\n{header}")
    cols = [("k-NN before", "knn_before", ".2f"), ("k-NN after", "knn_after", ".2f"), ("gain", "gain", "+.2f"),
            ("mAP@100", "map100", ".2f"), ("part mass", "part_mass", ".3f"), ("uniform", "uniform_mass", ".3f"),
            ("pointing", "pointing", ".3f"), ("top-k IoU", "iou", ".3f"), ("IoU chance", "iou_chance", ".3f"),
            ("RankMe", "rankme", ".1f"),
            ("H(P_t)", "teacher_entropy", ".2f"), ("H(mean P_t)", "teacher_batch_entropy", ".2f"),
            ("time (s)", "train_time_s", ".0f")]
    print(" | ".join(["contender", *(c[0] for c in cols), "log K", "collapse"]))
    for e in table:
        cells = [_cell(e, m, f) for _, m, f in cols]
        log_k = "-" if e["log_k"] is None else f"{e['log_k']:.2f}"
        print(" | ".join([e["contender"], *cells, log_k, ",".join(e["collapses"]) or "none"]))


def _signed(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:+.1f}"


def print_paired(pairs: list[dict]) -> None:
    """The k-NN-after rows (the gains' rows, in the JSON, hold the same numbers: k-NN before is shared)."""
    print("\npaired differences per seed (a - b, final k-NN top-1 points; the differences of the gains are the same, "
          "the k-NN before training being the same for every contender of a seed); 95 % Student-t interval "
          "with n - 1 dof; percentile bootstrap of the mean (10000 resamples)")
    print("a - b | metric | per seed | mean | 95 % CI (t) | 95 % bootstrap")
    names = {"knn_after": "k-NN after", "gain": "gain"}
    for p in pairs:
        if p["metric"] != "knn_after":
            continue
        per_seed = ", ".join(_signed(d) for d in p["differences"])
        print(f"{p['a']} - {p['b']} | {names[p['metric']]} | {per_seed} | {_signed(p['mean'])} | "
              f"[{_signed(p['ci_low'])}, {_signed(p['ci_high'])}] | [{_signed(p['boot_low'])}, {_signed(p['boot_high'])}]")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", choices=list(SETTINGS), default="demo",
                        help="demo: the program's defaults; hard: --synthetic_difficulty hard, 3x the epochs; "
                             "medium: --synthetic_difficulty medium --lr 0.016, 2x the epochs; digits: --dataset digits (scikit-learn's handwritten digits)")
    parser.add_argument("--contenders", nargs="+", choices=[*CONTENDERS, SUPERVISED], default=list(DEFAULT_CONTENDERS),
                        help="what to compare (supervised: the reference with labels; cmd-mean, cmd-sinkhorn and "
                             "cmd-koleo on request)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 per contender")
    parser.add_argument("--seed_list", type=int, nargs="+", default=None,
                        help="these seeds instead of 0 .. N-1 (e.g. to split one contender's seeds over processes)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the demo recipe's times the setting's factor)")
    parser.add_argument("--no_train", action="store_true",
                        help="only assemble the table from the cached runs (fails naming the runs missing)")
    parser.add_argument("--smoke", action="store_true", help="tiny data and network (the CI smoke test)")
    parser.add_argument("--work_dir", default="outputs/compare_presets", help="where the runs are written")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/compare_presets_SETTING.json)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="further options of the pretraining program (after --extra)")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    seeds = sorted(set(opts.seed_list)) if opts.seed_list else list(range(opts.seeds))
    if any(s < 0 for s in seeds):
        parser.error("--seed_list: seeds must be >= 0")
    setting_options, factor = SETTINGS[opts.setting]
    epochs = opts.epochs or _default("epochs") * factor
    base = [*(SMOKE if opts.smoke else []), "--epochs", str(epochs), *setting_options, *opts.extra]
    work_dir = Path(opts.work_dir) / opts.setting
    rows, missing = [], []
    for name in opts.contenders:
        for seed in seeds:
            row = run_one(name, seed, base, work_dir, train=not opts.no_train)
            if row is None:
                missing.append(str(work_dir / f"{name}_seed{seed}"))
            else:
                rows.append(row)
    if missing:
        raise SystemExit(f"--no_train: {len(missing)} run(s) not cached with these options: {', '.join(missing)}")
    problems = check_pairing(rows)
    if problems:
        raise SystemExit("the contenders of a seed are not paired (same data, same initial weights), so no paired "
                         "difference is shown:\n  " + "\n  ".join(problems))
    table = summarise(rows)
    pairs = paired(rows, seeds)
    header = (f"{opts.setting} setting, {epochs} epochs, seeds {seeds} (mean ± sample std); "
              f"options {' '.join(base)}; every seed's contenders share data and initial weights (checked)")
    print_table(table, header)
    print_paired(pairs)
    payload = {"setting": opts.setting, "epochs": epochs, "seeds": seeds, "options": base, "table": table,
               "paired": pairs, "pairing_checked": ["data_sha256", "init_sha256", "knn_before"], "runs": rows,
               "torch": torch.__version__, "cmd": cmd.__version__,
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    out = Path(opts.out or f"benchmarks/results/compare_presets_{opts.setting}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out, payload)
    print(f"written to {out}")
    return payload


if __name__ == "__main__":
    main()
