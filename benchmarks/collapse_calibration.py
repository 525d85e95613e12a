"""Calibrate the collapse warning against outcomes: which label-free signal tracks the k-NN gain?

Reads finished runs of ``cmd-fgvc pretrain`` (each a folder with ``log.jsonl``, ``steps.csv`` and
``args.json``: run them with ``--knn_every 1``), and for each run reports the k-NN gain (final top-1
minus the top-1 before training, points), the final epoch's teacher entropy over log K, batch-mean
entropy over log K, teacher-student KL, RankMe of the teacher's image vectors (and its ratio to the
first epoch's), and whether the collapse warning fires, replaying on the run's ``steps.csv`` (every
``--log_every`` steps) both the rule before issue 23 (``H(P_t) >= 0.9 log K``) and the current
`cmd.diagnose_collapse`. Then the Spearman rank correlation of each signal with the gain over all
runs. Prints a table, writes JSON and a PNG (each signal against the gain)::

    python benchmarks/collapse_calibration.py --runs seed0=/tmp/seeds/s0 seed1=/tmp/seeds/s1 ... \\
        --json benchmarks/results/collapse_calibration.json --out docs/assets/collapse_calibration.png

A run name ending in ``!`` marks a run built to collapse (drawn in red; the warning must fire), one
ending in ``~`` a run stopped before its last epoch (its gain is that of its last k-NN; it is left out
of the second correlation, over the finished runs only).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

import cmd

OLD_UNIFORM_TOLERANCE = 0.1  # the rule before issue 23: uniform when H(P_t) >= 0.9 log K

SIGNALS = {  # name -> (label, key of a run's row)
    "entropy_ratio": ("final H(P_t) / log K", "entropy_ratio"),
    "batch_entropy_ratio": ("final H(mean P_t) / log K", "batch_entropy_ratio"),
    "teacher_student_kl": ("final KL(P_t || p_s)", "teacher_student_kl"),
    "rankme": ("final RankMe", "rankme"),
    "rankme_ratio": ("RankMe final / epoch 1", "rankme_ratio"),
}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return float("nan")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):  # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _steps(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def replay(steps: list[dict[str, float]], out_dim: int, rule) -> str | None:
    """The first collapse kind ``rule(h, h_bar)`` gives on the logged steps (None: never)."""
    for row in steps:
        h, hb = row.get("teacher_entropy"), row.get("teacher_batch_entropy")
        if h is None or hb is None or not (math.isfinite(h) and math.isfinite(hb)):
            continue
        log_k = math.log(out_dim)
        h, hb = min(max(h, 0.0), log_k), min(max(hb, 0.0), log_k)  # csv rounding at the bounds
        kind = rule(h, hb)
        if kind:
            return kind
    return None


def old_rule(out_dim: int):
    log_k = math.log(out_dim)
    return lambda h, hb: ("uniform" if h >= (1 - OLD_UNIFORM_TOLERANCE) * log_k
                          else "one_hot" if hb <= 0.1 * log_k else None)


def new_rule(out_dim: int):
    return lambda h, hb: cmd.diagnose_collapse(h, hb, out_dim)


def spearman_table(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per signal: Spearman's rho with the gain and the number of runs that have the signal."""
    table = {}
    for name, (_, key) in SIGNALS.items():
        pairs = [(r[key], r["gain"]) for r in runs if r[key] is not None]
        rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
        table[name] = {"rho": rho if math.isfinite(rho) else None, "n": len(pairs)}  # None: too few runs
    return table


def summarise(name: str, folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    history = json.loads((folder / "args.json").read_text())  # one entry per start of the run
    out_dim = int((history[-1] if isinstance(history, list) else history)["args"]["out_dim"])
    log_k = math.log(out_dim)
    steps = _steps(folder / "steps.csv")
    before = next(r["knn_top1_before"] for r in rows if "knn_top1_before" in r)
    last = [r for r in rows if r.get("knn_top1") is not None][-1]  # a run stopped early: its last k-NN
    rows = rows[: rows.index(last) + 1]
    rankmes = [r.get("rankme") for r in rows]
    return {
        "run": name.rstrip("!~"), "built_to_collapse": name.endswith("!"), "stopped_early": name.endswith("~"),
        "folder": str(folder),
        "epochs": len(rows), "knn_before": before, "knn_after": last.get("knn_top1"),
        "gain": last["knn_top1"] - before, "best_gain": max(r.get("knn_top1", -1e9) for r in rows) - before,
        "entropy_ratio": last["teacher_entropy"] / log_k, "batch_entropy_ratio": last["teacher_batch_entropy"] / log_k,
        "teacher_student_kl": last.get("teacher_student_kl"),
        "rankme": rankmes[-1], "rankme_ratio": (rankmes[-1] / rankmes[0]) if rankmes[0] and rankmes[-1] else None,
        "rankme_per_epoch": rankmes, "knn_per_epoch": [r.get("knn_top1") for r in rows],
        "entropy_ratio_per_epoch": [r["teacher_entropy"] / log_k for r in rows],
        "max_step_entropy_ratio": max(s["teacher_entropy"] for s in steps) / log_k,
        "flag_old_rule": replay(steps, out_dim, old_rule(out_dim)),
        "flag_new_rule": replay(steps, out_dim, new_rule(out_dim)),
        "flag_logged": next((r["collapse"] for r in rows if r.get("collapse")), None),
    }


def plot(runs: list[dict], correlations: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s in SIGNALS if any(r[SIGNALS[s][1]] is not None for r in runs)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        label, key = SIGNALS[name]
        for r in runs:
            if r[key] is None:
                continue
            color = "tab:red" if r["built_to_collapse"] else "tab:blue"
            marker = "x" if r["flag_new_rule"] else "o"
            ax.scatter(r[key], r["gain"], c=color, marker=marker, s=28)
        ax.axhline(5, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(label)
        rho = correlations[name]["rho"]
        ax.set_title(f"Spearman {'-' if rho is None else f'{rho:+.2f}'} (n = {correlations[name]['n']})", fontsize=9)
    axes[0][0].set_ylabel("k-NN gain (points)")
    fig.suptitle("Collapse signals against the k-NN gain (blue: ordinary runs, red: built to collapse, "
                 "x: warning fires)", fontsize=9)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                        help="finished runs (NAME ending in ! : built to collapse)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/collapse_calibration.json"))
    parser.add_argument("--out", type=Path, default=None, help="PNG of each signal against the gain")
    args = parser.parse_args(argv)
    runs = []
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            parser.error(f"--runs: expected NAME=DIR, got {spec!r}")
        runs.append(summarise(name, Path(folder)))
    ordinary = [r for r in runs if not r["built_to_collapse"]]
    correlations = spearman_table(runs)
    correlations_finished = spearman_table([r for r in runs if not r["stopped_early"]])
    print("| run | k-NN before -> after (gain) | H(P_t)/log K final (max step) | H(mean P_t)/log K | RankMe "
          "(final / epoch 1) | old rule | new rule |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        rk = "-" if r["rankme"] is None else f"{r['rankme']:.1f} ({r['rankme_ratio']:.2f})"
        tag = " (built to collapse)" if r["built_to_collapse"] else f" (stopped, {r['epochs']} ep.)" if r["stopped_early"] else ""
        print(f"| {r['run']}{tag} | {r['knn_before']:.1f} -> "
              f"{r['knn_after']:.1f} ({r['gain']:+.1f}) | {r['entropy_ratio']:.3f} ({r['max_step_entropy_ratio']:.3f}) | "
              f"{r['batch_entropy_ratio']:.3f} | {rk} | {r['flag_old_rule'] or '-'} | {r['flag_new_rule'] or '-'} |")
    print("\nSpearman rank correlation with the k-NN gain: all runs | finished runs")
    for name in SIGNALS:
        a, f = correlations[name], correlations_finished[name]
        shown = ["-" if c["rho"] is None else f"{c['rho']:+.3f}" for c in (a, f)]
        print(f"  {SIGNALS[name][0]:28} {shown[0]} (n={a['n']}) | {shown[1]} (n={f['n']})")
    false_old = [r["run"] for r in ordinary if r["gain"] >= 5 and r["flag_old_rule"]]
    false_new = [r["run"] for r in ordinary if r["gain"] >= 5 and r["flag_new_rule"]]
    missed_new = [r["run"] for r in runs if r["built_to_collapse"] and not r["flag_new_rule"]]
    print(f"\nflagged although the k-NN rose >= 5 points: old rule {false_old or 'none'}, new rule {false_new or 'none'}")
    print(f"built to collapse but not flagged by the new rule: {missed_new or 'none'}")
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "runs": runs, "spearman_with_gain": correlations,
              "spearman_with_gain_finished_runs": correlations_finished,
              "false_flags_old_rule": false_old, "false_flags_new_rule": false_new, "missed_new_rule": missed_new}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, args.json)
    if args.out is not None:
        plot(runs, correlations, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
