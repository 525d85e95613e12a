"""Smoke runs of the benchmark scripts at their tiny settings: they run and write their JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(script: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_bench_train_step_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    result = _run("bench_train_step.py", "--smoke", "--out", str(out))
    data = json.loads(out.read_text())
    names = {r["contender"] for r in data["results"]}
    assert {"backbone", "cmd", "cmd-fused", "loop"} <= names
    assert all(r["step_ms"] > 0 and r["peak_mib"] > 0 for r in data["results"])
    assert "cmd / loop" in result.stdout


@pytest.mark.slow
def test_bench_losses_smoke(tmp_path):
    out = tmp_path / "losses.json"
    _run("bench_losses.py", "--device", "cpu", "--repeats", "1", "--warmup", "0", "--threads", "1",
         "--out-dims", "256", "--contenders", "loop", "aggregated", "CMDLoss", "fused", "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {r["preset"] for r in rows} == {"esvit", "cmd"}
    # the ratio to the loop with and without the prototype layer in the timed call (fused: inside only)
    assert {(r["contender"], r["prototypes_inside"]) for r in rows} == {
        *((c, True) for c in ("loop", "aggregated", "CMDLoss", "fused")),
        *((c, False) for c in ("loop", "aggregated", "CMDLoss"))}
    assert all(r["pair_ratio_min"] <= r["pair_ratio_median"] <= r["pair_ratio_max"] for r in rows)


@pytest.mark.slow
def test_bench_program_quick(tmp_path):
    out = tmp_path / "program.json"
    result = _run("bench_program.py", "--quick", "--threads", "1", "--out", str(out), timeout=600)
    data = json.loads(out.read_text())
    assert [r["setting"] for r in data["results"]] == ["demo", "mid"]
    for r in data["results"]:
        assert r["program"]["images_per_s"] > 0 and r["loop"]["images_per_s"] > 0
        assert r["startup_s"] > 0 and r["knn_s_per_call"] > 0
        assert len(r["program"]["images_per_s_per_step"]) == len(r["loop"]["images_per_s_per_step"]) == 2  # epochs
    assert "loop/program" in result.stdout


@pytest.mark.slow
def test_gpu_step_dry_run(tmp_path):
    """The GPU script's CPU dry run: step (eager + compiled), fused peak memory and k-NN code paths."""
    out = tmp_path / "gpu_step.json"
    _run("gpu_step.py", "--dry_run", "--out", str(out), timeout=600)
    data = json.loads(out.read_text())
    assert data["meta"]["dry_run"] is True
    assert [r["contender"] for r in data["step"]["rows"]] == ["backbone", "cmd", "backbone compiled", "cmd compiled"]
    assert [r["contender"] for r in data["fused"]["rows"]] == ["cmd", "cmd-fused chunk=1"]
    assert all(r["peak_mib"] > 0 for r in data["fused"]["rows"])
    assert {r["backend"] for r in data["knn"]["rows"]} == {"torch", "faiss"}


@pytest.mark.slow
def test_bench_knn_smoke(tmp_path):
    out = tmp_path / "knn.json"
    _run("bench_knn.py", "--small", "--repeats", "1", "--out", str(out))
    assert out.exists()


@pytest.mark.slow
def test_bench_backbone_multicrop_smoke(tmp_path):
    out = tmp_path / "multicrop.json"
    _run("bench_backbone_multicrop.py", "--models", "vit_tiny", "--batch", "1", "--repeats", "1", "--warmup", "0",
         "--n-local", "1", "--out", str(out))
    assert out.exists()


@pytest.mark.slow
def test_compare_presets_smoke(tmp_path):
    out = tmp_path / "compare.json"
    common = ["--smoke", "--epochs", "1", "--work_dir", str(tmp_path / "runs")]
    result = _run("compare_presets.py", *common, "--seeds", "2", "--contenders", "dino", "cmd", "supervised",
                  "--out", str(out), timeout=600)
    data = json.loads(out.read_text())
    assert [e["contender"] for e in data["table"]] == ["dino", "cmd", "supervised"] and data["seeds"] == [0, 1]
    for entry in data["table"][:2]:
        for key in ("knn_before", "knn_after", "gain", "map100", "part_mass", "uniform_mass", "pointing", "iou",
                    "iou_chance", "teacher_entropy", "teacher_batch_entropy", "rankme", "train_time_s"):
            assert entry[key] is not None, key
        assert 0 < entry["uniform_mass"] < 1 and 0 <= entry["map100"] <= 100
        assert 0 <= entry["pointing"] <= 1 and 0 <= entry["iou"] <= 1 and 0 < entry["iou_chance"] < 1
    # pairing holds: per seed, every contender (the supervised reference too) saw the same data and weights
    runs = data["runs"]
    for seed in (0, 1):
        mine = [r for r in runs if r["seed"] == seed]
        assert len({(r["data_sha256"], r["init_sha256"], round(r["knn_before"], 4)) for r in mine}) == 1
    assert runs[0]["data_sha256"] != runs[1]["data_sha256"]  # the seed draws the data
    # the paired rows: per-seed differences of the rows, and their mean
    pairs = {(p["a"], p["b"], p["metric"]): p for p in data["paired"]}
    assert set(pairs) == {("cmd", "dino", "knn_after"), ("cmd", "dino", "gain"), ("dino", "random-init", "knn_after"),
                          ("cmd", "random-init", "knn_after"), ("dino", "supervised", "knn_after"),
                          ("dino", "supervised", "gain"), ("cmd", "supervised", "knn_after"),
                          ("cmd", "supervised", "gain")}
    by = {(r["contender"], r["seed"]): r for r in runs}
    p = pairs[("cmd", "dino", "knn_after")]
    assert p["differences"] == [by[("cmd", s)]["knn_after"] - by[("dino", s)]["knn_after"] for s in (0, 1)]
    assert p["ci_low"] <= p["mean"] <= p["ci_high"]
    assert pairs[("cmd", "random-init", "knn_after")]["differences"] == [by[("cmd", s)]["gain"] for s in (0, 1)]
    # where the cmd runs' MIL pooling puts its weight (mil_weight_map.py reads the same run folders) ...
    maps = tmp_path / "maps.json"
    _run("mil_weight_map.py", "--runs", f"cmd={tmp_path / 'runs' / 'demo'}/cmd_seed*", "--json", str(maps))
    rows = {r["run"]: r for r in json.loads(maps.read_text())["runs"]}
    assert sorted(rows) == ["cmd/cmd_seed0", "cmd/cmd_seed1"]
    assert rows["cmd/cmd_seed0"]["part_mass"] == pytest.approx(by[("cmd", 0)]["part_mass"], abs=1e-5)
    # ... and a run without a trained MIL pooling is refused, not mapped from a fresh one
    refused = subprocess.run([sys.executable, str(BENCH / "mil_weight_map.py"), "--runs",
                              f"dino={tmp_path / 'runs' / 'demo' / 'dino_seed0'}", "--json", str(maps)],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "trained no MIL pooling" in refused.stderr
    assert "cmd - esvit" not in result.stdout and "cmd - dino | k-NN after" in result.stdout
    # a finished run is read back, not trained again (the same row, training time included) ...
    again = tmp_path / "again.json"
    _run("compare_presets.py", *common, "--seeds", "2", "--out", str(again), "--contenders", "cmd", "--no_train")
    assert json.loads(again.read_text())["runs"] == [r for r in runs if r["contender"] == "cmd"]
    # ... a lane not run yet is named by --no_train ...
    missing = subprocess.run([sys.executable, str(BENCH / "compare_presets.py"), *common, "--seeds", "2",
                              "--contenders", "esvit", "--no_train"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "esvit_seed0" in missing.stderr and "esvit_seed1" in missing.stderr
    # ... a folder holding a run with other options is refused, not mixed into the table ...
    refused = subprocess.run([sys.executable, str(BENCH / "compare_presets.py"), "--smoke", "--seeds", "1",
                              "--epochs", "2", "--work_dir", str(tmp_path / "runs"), "--contenders", "cmd"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "holds a run with other options" in refused.stderr
    # ... and runs of one seed that did not start from the same weights are not paired
    cache = tmp_path / "runs" / "demo" / "cmd_seed1" / "compare_row.json"
    cached = json.loads(cache.read_text())
    cached["row"]["init_sha256"] = "0" * 64
    cache.write_text(json.dumps(cached))
    unpaired = subprocess.run([sys.executable, str(BENCH / "compare_presets.py"), *common, "--seeds", "2",
                               "--contenders", "dino", "cmd", "--no_train"], cwd=ROOT, capture_output=True, text=True)
    assert unpaired.returncode != 0 and "seed 1: other initial backbone weights" in unpaired.stderr


@pytest.mark.slow
def test_two_stage_smoke(tmp_path):
    work, out = tmp_path / "runs", tmp_path / "two_stage.json"
    common = ["--smoke", "--epochs", "1", "--seeds", "2", "--contenders", "dino", "cmd", "--work_dir", str(work)]
    # lanes: stage 1 and stage 2 in one process, the runs from scratch in another, then the tables
    _run("two_stage.py", *common, "--arms", "stage1", "from_stage1", timeout=600)
    _run("two_stage.py", *common, "--arms", "scratch", timeout=600)
    result = _run("two_stage.py", *common, "--no_train", "--out", str(out))
    data = json.loads(out.read_text())
    stage1 = data["stage1"]
    assert Path(stage1["checkpoint"]).is_file() and "--recipe" in stage1["argv"] and "broad" in stage1["argv"]
    scratch, staged = data["scratch"]["runs"], data["from_stage1"]["runs"]
    assert len(scratch) == len(staged) == 4
    # stage 2 starts from the stage-1 backbone: other initial weights than from scratch, the same for every
    # contender of a seed, and the same for every seed (one stage-1 checkpoint)
    assert {r["init_sha256"] for r in staged}.isdisjoint({r["init_sha256"] for r in scratch})
    assert len({r["init_sha256"] for r in staged}) == 1 and len({r["init_sha256"] for r in scratch}) == 2
    assert data["from_stage1"]["options"][-2:] == ["--init", stage1["checkpoint"]]
    # the effect rows: from stage 1 minus from scratch, per seed
    effect = {e["contender"]: e for e in data["stage1_effect"]}
    assert set(effect) == {"dino", "cmd"}
    by = {(r["contender"], r["seed"]): r["knn_after"] for r in staged}
    ref = {(r["contender"], r["seed"]): r["knn_after"] for r in scratch}
    assert effect["cmd"]["differences"] == [by[("cmd", s)] - ref[("cmd", s)] for s in (0, 1)]
    assert "stage 1's effect" in result.stdout and "cmd | " in result.stdout
    # a stage 2 without its stage 1 is refused, naming what to run
    missing = subprocess.run([sys.executable, str(BENCH / "two_stage.py"), *common[:-1], str(tmp_path / "other"),
                              "--no_train"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "--arms stage1" in missing.stderr


@pytest.mark.slow
def test_bench_checkpoint_verify_smoke(tmp_path):
    out = tmp_path / "verify.json"
    result = _run("bench_checkpoint_verify.py", "--mib", "2", "--repeats", "1", "--out", str(out))
    data = json.loads(out.read_text())
    assert {"torch.load", "read_checkpoint (now)", "tensor checksums"} <= set(data["seconds"])
    assert "verification overhead now" in result.stdout
