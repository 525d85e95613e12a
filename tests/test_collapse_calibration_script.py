"""benchmarks/collapse_calibration.py: Spearman against scipy, and the table/JSON on fabricated run folders."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "collapse_calibration.py"


@pytest.fixture(scope="module")
def calib():
    spec = importlib.util.spec_from_file_location("collapse_calibration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_matches_scipy(calib):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 7, 20):
        x, y = rng.normal(size=n), rng.normal(size=n)
        x[1] = x[0]  # a tie
        assert calib.spearman(list(x), list(y)) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(calib.spearman([1.0, 2.0], [2.0, 1.0])) and math.isnan(calib.spearman([1, 1, 1], [1, 2, 3]))


def _run_folder(path: Path, knn: list[float], entropy: list[float], rankme: list[float]) -> Path:
    path.mkdir()
    k, log_k = 128, math.log(128)
    rows = [{"epoch": e + 1, "teacher_entropy": h, "teacher_batch_entropy": 0.99 * log_k, "teacher_student_kl": 0.6,
             "rankme": r, "knn_top1": a} for e, (a, h, r) in enumerate(zip(knn[1:], entropy, rankme))]
    rows[0]["knn_top1_before"] = knn[0]
    (path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "args.json").write_text(json.dumps([{"args": {"out_dim": k}}]))
    lines = ["step,teacher_entropy,teacher_batch_entropy"]
    lines += [f"{10 * (i + 1)},{h},{0.99 * log_k}" for i, h in enumerate(entropy)]
    (path / "steps.csv").write_text("\n".join(lines) + "\n")
    return path


def test_table_json_and_rules(calib, tmp_path, capsys):
    log_k = math.log(128)
    learned = _run_folder(tmp_path / "a", [40.0, 50.0, 55.0], [0.5 * log_k, 0.93 * log_k], [50.0, 48.0])
    flat = _run_folder(tmp_path / "b", [40.0, 41.0, 40.0], [0.9 * log_k, 0.995 * log_k], [49.0, 40.0])
    middle = _run_folder(tmp_path / "c", [40.0, 44.0, 43.0], [0.6 * log_k, 0.8 * log_k], [50.0, 45.0])
    out = tmp_path / "cal.json"
    calib.main(["--runs", f"learned={learned}", f"collapsed!={flat}", f"middle~={middle}", "--json", str(out)])
    data = json.loads(out.read_text())
    by = {r["run"]: r for r in data["runs"]}
    assert by["learned"]["gain"] == 15.0 and by["learned"]["flag_old_rule"] == "uniform"  # 0.93 log K
    assert by["learned"]["flag_new_rule"] is None and by["collapsed"]["flag_new_rule"] == "uniform"
    assert data["false_flags_old_rule"] == ["learned"] and data["false_flags_new_rule"] == []
    assert by["middle"]["stopped_early"] and data["spearman_with_gain_finished_runs"]["rankme"]["n"] == 2
    assert data["spearman_with_gain"]["rankme"] == {"rho": 1.0, "n": 3}  # 48 > 45 > 40 and 15 > 3 > 0
    assert "| learned | 40.0 -> 55.0 (+15.0)" in capsys.readouterr().out


def test_patterns_groups_and_the_three_rules(calib, tmp_path, capsys):
    """A pattern names one run per folder with a log (group = its NAME); the 0.97 rule is replayed too."""
    log_k = math.log(128)
    runs = tmp_path / "medium"
    runs.mkdir()
    _run_folder(runs / "dino_seed0", [15.0, 18.0, 22.0], [0.9 * log_k, 0.974 * log_k], [45.0, 44.0])  # learned +7
    _run_folder(runs / "dino_seed1", [15.0, 15.0, 15.0], [0.95 * log_k, 0.991 * log_k], [45.0, 40.0])  # collapsed
    (runs / "supervised_seed0").mkdir()  # compare_presets' supervised reference: no log.jsonl
    demo = _run_folder(tmp_path / "demo", [40.0, 50.0, 60.0], [0.5 * log_k, 0.88 * log_k], [50.0, 49.0])
    out = tmp_path / "cal.json"
    calib.main(["--runs", f"medium={runs}/*_seed*", f"demo/s0={demo}", "--json", str(out)])
    data = json.loads(out.read_text())
    by = {r["run"]: r for r in data["runs"]}
    assert sorted(by) == ["demo/s0", "medium/dino_seed0", "medium/dino_seed1"]
    assert by["medium/dino_seed0"]["group"] == "medium" and by["demo/s0"]["group"] == "demo"
    assert data["skipped_without_log"] == [str(runs / "supervised_seed0")]
    assert by["medium/dino_seed0"]["flag_previous_rule"] == "uniform"  # 0.974 >= 0.97: the misfire
    assert by["medium/dino_seed0"]["flag_new_rule"] is None and by["medium/dino_seed1"]["flag_new_rule"] == "uniform"
    assert data["false_flags_previous_rule"] == ["medium/dino_seed0"] and data["false_flags_new_rule"] == []
    groups = {g["group"]: g for g in data["groups"]}
    assert groups["medium"]["n"] == 2 and groups["medium"]["n_learned"] == 1
    assert groups["medium"]["max_step_entropy_ratio_learned"] == pytest.approx(0.974)
    assert groups["medium"]["flags_learned"] == {"flag_old_rule": 1, "flag_previous_rule": 1, "flag_second_rule": 0,
                                                 "flag_new_rule": 0}
    assert groups["medium"]["flags_other"]["flag_new_rule"] == 1
    assert "| medium | 2 | +0.0 to +7.0 | 1 | 0.974 |" in capsys.readouterr().out
    assert data["false_flags_second_rule"] == []


def test_bad_run_specs(calib, tmp_path):
    with pytest.raises(SystemExit):
        calib.main(["--runs", "no-folder", "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit):  # a pattern that matches nothing is an error, not an empty table
        calib.main(["--runs", f"g={tmp_path}/nothing*", "--json", str(tmp_path / "x.json")])


def test_pattern_names_are_paths_below_the_fixed_folders_and_unique(calib, tmp_path):
    log_k = math.log(128)
    for arm in ("B", "C"):
        (tmp_path / arm).mkdir()
        _run_folder(tmp_path / arm / "s1", [40.0, 45.0, 50.0], [0.5 * log_k, 0.88 * log_k], [50.0, 49.0])
    out = tmp_path / "cal.json"
    calib.main(["--runs", f"ablation={tmp_path}/[BC]/s*", "--json", str(out)])
    assert [r["run"] for r in json.loads(out.read_text())["runs"]] == ["ablation/B/s1", "ablation/C/s1"]
    with pytest.raises(SystemExit):  # the same run twice
        calib.main(["--runs", f"a/x={tmp_path / 'B' / 's1'}", f"a/x={tmp_path / 'C' / 's1'}", "--json", str(out)])
