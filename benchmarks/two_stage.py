"""The paper's two-stage protocol at CPU scale: generic self-supervised pretraining, then each method from it.

The paper does not train from scratch: it continues self-supervised training on the fine-grained
set from EsViT's ImageNet checkpoint. This script runs the same two stages, one command for both:

1. **Stage 1** (once, cached): ``cmd-fgvc pretrain --recipe stage1`` on broad synthetic data
   (``--synthetic_difficulty broad``: `cmd.SyntheticBroad`, four kinds of scene and 4 x 4-cell part
   patterns that are not the fine-grained set's classes), EsViT's loss. Its teacher backbone is the
   shared starting point.
2. **Stage 2**: `compare_presets.py` on the fine-grained ``--setting`` (``medium`` by default), every
   contender (dino, esvit, cmd, and the supervised reference) and seed starting from the stage-1
   backbone (``--init``), with the setting's budget. The heads start fresh, as the paper's do.
3. **From scratch**: the same runs from random weights (the setting's own `compare_presets.py` table).

It prints both tables of `compare_presets.py` (per contender, and paired per seed with 95 %
intervals) and the effect of stage 1 per contender: the final k-NN from stage 1 minus from scratch,
per seed, with its 95 % intervals. Whether stage 1 makes the setting learnable is read there. ::

    python benchmarks/two_stage.py --setting medium                      # everything, 5 seeds
    python benchmarks/two_stage.py --setting medium --arms stage1        # lanes: stage 1 first ...
    python benchmarks/two_stage.py --setting medium --arms from_stage1 --contenders cmd --seed_list 0 1
    python benchmarks/two_stage.py --setting medium --no_train           # ... then the tables

Every run is cached (stage 1 in ``WORK_DIR/stage1/stage1.json``, the others by `compare_presets.py`),
so lanes can run in separate processes and a last call assembles the tables. A benchmark, not a
test: report whichever way it comes out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_presets  # noqa: E402
from paired_stats import paired_difference  # noqa: E402

ARMS = ("stage1", "from_stage1", "scratch")
STAGE1_RECIPE = "stage1"
# the broad data of stage 1: 64 classes (16 per kind of scene) x 30 images = 1920 images, 60 steps an epoch
STAGE1_DATA = ["--synthetic_difficulty", "broad", "--synthetic_classes", "64", "--synthetic_per_class", "30"]
STAGE1_SMOKE = ["--synthetic_difficulty", "broad", "--synthetic_classes", "8", "--synthetic_per_class", "4",
                "--epochs", "1"]


def stage1_argv(out_dir: Path, seed: int, smoke: bool) -> list[str]:
    """The options of the stage-1 run: the ``stage1`` recipe on the broad data."""
    data = [*compare_presets.SMOKE, *STAGE1_SMOKE] if smoke else STAGE1_DATA
    return ["--recipe", STAGE1_RECIPE, *data, "--seed", str(seed), "--output_dir", str(out_dir), "--no_progress"]


def run_stage1(work_dir: Path, seed: int, smoke: bool, train: bool = True) -> dict | None:
    """Train stage 1 once (read back when cached with the same options); its record, or None when not cached."""
    out_dir = work_dir / "stage1"
    argv = stage1_argv(out_dir, seed, smoke)
    cache = out_dir / "stage1.json"
    record = compare_presets._cached(cache, argv)
    if record is not None or not train:
        return record
    t0 = time.perf_counter()
    compare_presets._pretrain(argv)
    elapsed = time.perf_counter() - t0
    epochs = compare_presets.read_epoch_log(out_dir)
    record = {"checkpoint": str(out_dir / "checkpoint.pth"), "argv": argv, "train_time_s": elapsed,
              "steps": epochs[-1]["step"], "knn_before": epochs[0].get("knn_top1_before"),
              "knn_after": epochs[-1].get("knn_top1"), "rankme": epochs[-1].get("rankme"),
              "collapse": sorted({e["collapse"] for e in epochs if e.get("collapse")})}
    compare_presets._write_json_atomic(cache, {"argv": argv, "row": record})
    return record


def stage1_effect(scratch: dict, staged: dict) -> list[dict]:
    """Per contender in both arms: final k-NN from stage 1 minus from scratch, per seed, with intervals."""
    by_scratch = {(r["contender"], r["seed"]): r for r in scratch["runs"]}
    by_staged = {(r["contender"], r["seed"]): r for r in staged["runs"]}
    seeds = staged["seeds"]
    out = []
    for name in dict.fromkeys(r["contender"] for r in staged["runs"]):
        if not all((name, s) in by_scratch for s in seeds):
            continue
        a = [by_staged[(name, s)]["knn_after"] for s in seeds]
        b = [by_scratch[(name, s)]["knn_after"] for s in seeds]
        stats = paired_difference(a, b).as_dict()
        out.append({"contender": name, "seeds": seeds, "from_stage1": a, "scratch": b,
                    "start_stage1": [by_staged[(name, s)]["knn_before"] for s in seeds],
                    "start_scratch": [by_scratch[(name, s)]["knn_before"] for s in seeds], **stats})
    return out


def print_effect(effect: list[dict]) -> None:
    sign = compare_presets._signed
    print("\nstage 1's effect: final k-NN top-1 from the stage-1 backbone minus from random weights, per seed "
          "(same data, seeds and budget); 95 % Student-t and bootstrap intervals")
    print("contender | start: scratch -> stage 1 | final: scratch -> stage 1 | per seed | mean | 95 % CI (t) | "
          "95 % bootstrap")
    for e in effect:
        print(f"{e['contender']} | {fmean(e['start_scratch']):.2f} -> {fmean(e['start_stage1']):.2f} | "
              f"{fmean(e['scratch']):.2f} -> {fmean(e['from_stage1']):.2f} | "
              f"{', '.join(sign(d) for d in e['differences'])} | {sign(e['mean'])} | "
              f"[{sign(e['ci_low'])}, {sign(e['ci_high'])}] | [{sign(e['boot_low'])}, {sign(e['boot_high'])}]")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--setting", choices=list(compare_presets.SETTINGS), default="medium",
                        help="the fine-grained data of stage 2 (benchmarks/compare_presets.py's settings)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="what to run: stage1 (the generic pretraining), from_stage1 (stage 2), scratch (the "
                             "same runs from random weights); the tables need all three cached")
    parser.add_argument("--contenders", nargs="+", choices=[*compare_presets.CONTENDERS, compare_presets.SUPERVISED],
                        default=list(compare_presets.DEFAULT_CONTENDERS))
    parser.add_argument("--scratch_contenders", nargs="+", choices=[*compare_presets.CONTENDERS,
                                                                   compare_presets.SUPERVISED], default=None,
                        help="the contenders of the scratch arm, when they are not --contenders (e.g. only cmd, "
                             "to measure stage 1's effect on one method at a lower cost)")
    parser.add_argument("--seeds", type=int, default=5, help="stage-2 seeds 0 .. N-1")
    parser.add_argument("--seed_list", type=int, nargs="+", default=None, help="these stage-2 seeds instead")
    parser.add_argument("--stage1_seed", type=int, default=0, help="seed of the one stage-1 run")
    parser.add_argument("--no_train", action="store_true", help="only assemble the tables from cached runs")
    parser.add_argument("--smoke", action="store_true", help="tiny data and network (the CI smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs (default: the setting's)")
    parser.add_argument("--work_dir", default="outputs/two_stage", help="where the runs are written")
    parser.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/two_stage_SETTING.json)")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error("--seeds must be >= 1")
    if opts.stage1_seed < 0:
        parser.error("--stage1_seed must be >= 0")
    work_dir = Path(opts.work_dir)
    train = not opts.no_train
    arms = ARMS if opts.no_train else tuple(opts.arms)  # --no_train assembles every arm
    stage1 = None
    if "stage1" in arms or "from_stage1" in arms:
        stage1 = run_stage1(work_dir, opts.stage1_seed, opts.smoke, train=train and "stage1" in arms)
        if stage1 is None:
            raise SystemExit(f"stage 1 is not cached in {work_dir / 'stage1'} with these options: "
                             "run --arms stage1 first")
        print(f"stage 1 ({STAGE1_RECIPE} recipe, broad data, {stage1['steps']} steps, {stage1['train_time_s']:.0f} s): "
              f"k-NN on its own test split {stage1['knn_before']:.2f} -> {stage1['knn_after']:.2f} %")
    common = ["--setting", opts.setting]
    common += ["--seed_list", *map(str, opts.seed_list)] if opts.seed_list else ["--seeds", str(opts.seeds)]
    common += [*(["--smoke"] if opts.smoke else []), *(["--epochs", str(opts.epochs)] if opts.epochs else [])]
    results = {}
    for arm in ("scratch", "from_stage1"):
        if arm not in arms:
            continue
        contenders = opts.scratch_contenders if arm == "scratch" and opts.scratch_contenders else opts.contenders
        arm_argv = [*common, "--contenders", *contenders, "--work_dir", str(work_dir / arm),
                    "--out", str(work_dir / f"{arm}_{opts.setting}.json")]
        if not train:
            arm_argv.append("--no_train")
        if arm == "from_stage1":
            arm_argv += ["--extra", "--init", stage1["checkpoint"]]
        print(f"\n==== {arm.replace('_', ' ')}: benchmarks/compare_presets.py {' '.join(arm_argv)}")
        results[arm] = compare_presets.main(arm_argv)
    if len(results) < 2:
        print("\nstage 1's effect needs both arms: run the missing ones, then --no_train for every table")
        return {"setting": opts.setting, "stage1": stage1, **results}
    effect = stage1_effect(results["scratch"], results["from_stage1"])
    print_effect(effect)
    payload = {"setting": opts.setting, "stage1": stage1, "scratch": results["scratch"],
               "from_stage1": results["from_stage1"], "stage1_effect": effect}
    out = Path(opts.out or f"benchmarks/results/two_stage_{opts.setting}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    compare_presets._write_json_atomic(out, payload)
    print(f"written to {out}")
    return payload


if __name__ == "__main__":
    main()
