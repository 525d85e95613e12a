"""Calibrate the collapse warning against outcomes: which label-free signal tracks the k-NN gain?

Reads finished runs of ``cmd-fgvc pretrain`` (each a folder with ``log.jsonl``, ``steps.csv`` and
``args.json``: run them with ``--knn_every 1``), and for each run reports the k-NN gain (final top-1
minus the top-1 before training, points), the final epoch's teacher entropy over log K, batch-mean
entropy over log K, teacher-student KL, RankMe of the teacher's image vectors (and its ratio to the
first epoch's), and whether the collapse warning fires, replaying on the run's ``steps.csv`` (every
``--log_every`` steps) each uniform threshold the library has had (``H(P_t) >= 0.9 log K`` before
issue 23, ``0.97`` and ``0.98 log K`` after its first calibrations) and the current
`cmd.diagnose_collapse`. Then
the Spearman rank correlation of each signal with the gain, over all runs and within each group.
Prints a table per run and one per group, writes JSON and a PNG (each signal against the gain)::

    python benchmarks/collapse_calibration.py --runs demo/seed0=/tmp/seeds/s0 demo/seed1=/tmp/seeds/s1 ... \\
        --json benchmarks/results/collapse_calibration.json --out docs/assets/collapse_calibration.png
    python benchmarks/collapse_calibration.py --runs 'medium-scratch=outputs/compare/medium/*_seed*' ...

A run's group is its name up to the first ``/`` (``runs`` without one): gains are compared within a
group (the same data and budget) as well as over all runs. A ``DIR`` with ``*``, ``?`` or ``[``
is a pattern: every folder it matches that holds a ``log.jsonl`` is a run named ``NAME/FOLDER``
(group ``NAME``; folders without one, e.g. `compare_presets.py`'s supervised reference, are
skipped and listed). A run name ending in ``!`` marks a run built to collapse (drawn in red; the
warning must fire), one ending in ``~`` a run stopped before its last epoch (its gain is that of its
last k-NN; it is left out of the correlations over the finished runs only).
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
from cmd.losses.cmd import UNIFORM_TOLERANCE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_specs import expand_all  # noqa: E402

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


# JSON key -> (column title, uniform tolerance of `cmd.diagnose_collapse`): every threshold the library has had
RULES = {
    "flag_old_rule": ("0.9 log K", 0.1),  # before issue 23
    "flag_previous_rule": ("0.97 log K", 0.03),  # issue 23's first calibration
    "flag_second_rule": ("0.98 log K", 0.02),  # its second
    "flag_new_rule": ("now", UNIFORM_TOLERANCE),
}


def threshold_rule(out_dim: int, uniform_tolerance: float):
    """`cmd.diagnose_collapse` with the uniform threshold ``(1 - uniform_tolerance) log K``."""
    return lambda h, hb: cmd.diagnose_collapse(h, hb, out_dim, uniform_tolerance=uniform_tolerance)


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
        "run": name.rstrip("!~"), "group": name.split("/", 1)[0] if "/" in name else "runs",
        "built_to_collapse": name.endswith("!"), "stopped_early": name.endswith("~"),
        "folder": str(folder),
        "epochs": len(rows), "knn_before": before, "knn_after": last.get("knn_top1"),
        "gain": last["knn_top1"] - before, "best_gain": max(r.get("knn_top1", -1e9) for r in rows) - before,
        "entropy_ratio": last["teacher_entropy"] / log_k, "batch_entropy_ratio": last["teacher_batch_entropy"] / log_k,
        "teacher_student_kl": last.get("teacher_student_kl"),
        "rankme": rankmes[-1], "rankme_ratio": (rankmes[-1] / rankmes[0]) if rankmes[0] and rankmes[-1] else None,
        "rankme_per_epoch": rankmes, "knn_per_epoch": [r.get("knn_top1") for r in rows],
        "entropy_ratio_per_epoch": [r["teacher_entropy"] / log_k for r in rows],
        "max_step_entropy_ratio": max(s["teacher_entropy"] for s in steps) / log_k,
        **{key: replay(steps, out_dim, threshold_rule(out_dim, tolerance)) for key, (_, tolerance) in RULES.items()},
        "flag_logged": next((r["collapse"] for r in rows if r.get("collapse")), None),
    }


def group_table(runs: list[dict]) -> list[dict]:
    """Per group: the runs, their gains, the entropy reached by the runs that learned, the flags of each rule."""
    out = []
    for group in dict.fromkeys(r["group"] for r in runs):
        members = [r for r in runs if r["group"] == group]
        learned = [r for r in members if not r["built_to_collapse"] and r["gain"] >= 5]
        out.append({
            "group": group, "n": len(members), "gain_min": min(r["gain"] for r in members),
            "gain_max": max(r["gain"] for r in members), "n_learned": len(learned),
            "max_step_entropy_ratio_learned": max((r["max_step_entropy_ratio"] for r in learned), default=None),
            "flags_learned": {key: sum(bool(r[key]) for r in learned) for key in RULES},
            "flags_other": {key: sum(bool(r[key]) for r in members if r not in learned) for key in RULES},
            "spearman_with_gain": spearman_table(members),
        })
    return out


def plot(runs: list[dict], correlations: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r["group"] for r in runs))
    colors = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    names = [s for s in SIGNALS if any(r[SIGNALS[s][1]] is not None for r in runs)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        label, key = SIGNALS[name]
        for r in runs:
            if r[key] is None:
                continue
            marker = "x" if r["flag_new_rule"] else "o"
            edge = "red" if r["built_to_collapse"] else colors[r["group"]]
            ax.scatter(r[key], r["gain"], c=[colors[r["group"]]], marker=marker, s=30 if marker == "x" else 22,
                       edgecolors=[edge] if marker == "o" else None, linewidths=1.2)
        ax.axhline(5, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(label)
        rho = correlations[name]["rho"]
        ax.set_title(f"Spearman {'-' if rho is None else f'{rho:+.2f}'} (n = {correlations[name]['n']})", fontsize=9)
    axes[0][0].set_ylabel("k-NN gain (points)")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colors[g], label=g) for g in groups]
    handles.append(plt.Line2D([], [], ls="", marker="o", mfc="white", mec="red", label="built to collapse"))
    handles.append(plt.Line2D([], [], ls="", marker="x", color="black", label="warning fires"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle("Collapse signals of the last epoch against the k-NN gain", fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def _rho(c: dict) -> str:
    return "-" if c["rho"] is None else f"{c['rho']:+.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                        help="finished runs (NAME ending in ! : built to collapse; DIR may be a pattern)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/collapse_calibration.json"))
    parser.add_argument("--out", type=Path, default=None, help="PNG of each signal against the gain")
    args = parser.parse_args(argv)
    try:
        named, skipped = expand_all(args.runs)
    except ValueError as err:
        parser.error(str(err))
    runs = [summarise(name, folder) for name, folder in named]
    if skipped:
        print(f"skipped (no log.jsonl): {', '.join(skipped)}")
    ordinary = [r for r in runs if not r["built_to_collapse"]]
    correlations = spearman_table(runs)
    correlations_finished = spearman_table([r for r in runs if not r["stopped_early"]])
    rule_titles = " | ".join(title for title, _ in RULES.values())
    print(f"| run | k-NN before -> after (gain) | H(P_t)/log K final (max step) | H(mean P_t)/log K | "
          f"KL final | RankMe (final / epoch 1) | {rule_titles} |")
    print("|---|---|---|---|---|---|" + "---|" * len(RULES))
    for r in runs:
        rk = "-" if r["rankme"] is None else f"{r['rankme']:.1f} ({r['rankme_ratio']:.2f})"
        kl = "-" if r["teacher_student_kl"] is None else f"{r['teacher_student_kl']:.3f}"
        tag = " (built to collapse)" if r["built_to_collapse"] else f" (stopped, {r['epochs']} ep.)" if r["stopped_early"] else ""
        flags = " | ".join(r[key] or "-" for key in RULES)
        print(f"| {r['run']}{tag} | {r['knn_before']:.1f} -> "
              f"{r['knn_after']:.1f} ({r['gain']:+.1f}) | {r['entropy_ratio']:.3f} ({r['max_step_entropy_ratio']:.3f}) | "
              f"{r['batch_entropy_ratio']:.3f} | {kl} | {rk} | {flags} |")
    groups = group_table(runs)
    print(f"\n| group | runs | gain | runs gaining >= 5 | their max step H(P_t)/log K | flagged of those: {rule_titles} "
          f"| flagged of the others: {rule_titles} | Spearman H(P_t) | Spearman RankMe ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g in groups:
        h = g["max_step_entropy_ratio_learned"]
        print(f"| {g['group']} | {g['n']} | {g['gain_min']:+.1f} to {g['gain_max']:+.1f} | {g['n_learned']} | "
              f"{'-' if h is None else f'{h:.3f}'} | {' / '.join(str(v) for v in g['flags_learned'].values())} | "
              f"{' / '.join(str(v) for v in g['flags_other'].values())} | "
              f"{_rho(g['spearman_with_gain']['entropy_ratio'])} | {_rho(g['spearman_with_gain']['rankme_ratio'])} |")
    print("\nSpearman rank correlation with the k-NN gain: all runs | finished runs")
    for name in SIGNALS:
        a, f = correlations[name], correlations_finished[name]
        print(f"  {SIGNALS[name][0]:28} {_rho(a)} (n={a['n']}) | {_rho(f)} (n={f['n']})")
    false_flags = {key: [r["run"] for r in ordinary if r["gain"] >= 5 and r[key]] for key in RULES}
    missed_new = [r["run"] for r in runs if r["built_to_collapse"] and not r["flag_new_rule"]]
    for key, (title, _) in RULES.items():
        print(f"flagged although the k-NN rose >= 5 points, rule {title}: {false_flags[key] or 'none'}")
    print(f"built to collapse but not flagged by the current rule: {missed_new or 'none'}")
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "uniform_threshold": 1 - UNIFORM_TOLERANCE,
              "runs": runs, "groups": groups, "spearman_with_gain": correlations,
              "spearman_with_gain_finished_runs": correlations_finished,
              **{key.replace("flag_", "false_flags_", 1): runs for key, runs in false_flags.items()},
              "missed_new_rule": missed_new,
              "skipped_without_log": skipped}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, args.json)
    if args.out is not None:
        plot(runs, correlations, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
