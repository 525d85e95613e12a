"""examples/train_cmd_minimal.py: the flat wiring example runs (1 epoch on less synthetic data)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "train_cmd_minimal.py"


def test_minimal_example_runs_reduced():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(SCRIPT), "--epochs", "1", "--classes", "4", "--per_class", "8"],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"k-NN top-1 before training: \d+\.\d %", out), out
    assert re.search(r"epoch 1/1  loss \d+\.\d+  image \d+\.\d+  region \d+\.\d+  inter_level \d+\.\d+", out), out
    assert re.search(r"k-NN top-1 after training: \d+\.\d %", out), out


def test_minimal_example_stays_short():
    lines = SCRIPT.read_text().splitlines()
    assert len(lines) <= 110, len(lines)
    assert "import cmd" in lines and not any(line.startswith("def main") for line in lines)  # flat
