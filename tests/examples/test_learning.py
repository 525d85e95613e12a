"""Learning happens (issue 13, point 6): a short pretraining run lifts the teacher's k-NN clearly above its start.

A regression that stops learning (a broken loss, schedule, EMA or augmentation) fails this test.
The run is the pretraining program itself, in a reduced setting: fixed seed, CPU, one thread,
deterministic algorithms, no data-loading workers. The setting lives in ONE place,
`LEARNING_TEST_ARGS` below, and the margin in `MIN_KNN_GAIN`; a speed target belongs in a
benchmark, not here.
"""

from __future__ import annotations

import json

import pytest
import torch

from cmd.cli import pretrain

# --------------------------------------------------------------------- the setting (one place)
LEARNING_TEST_ARGS: dict[str, object] = {
    # the demo's defaults (`cmd-fgvc pretrain` with no options: narrow ResNet-18, the "demo" synthetic
    # data at 32 px, head BatchNorm, K = 128, ...), shortened to 2 epochs (62 steps)
    "epochs": 2,
    "seed": 0,
    "knn_k": 20,
}
# teacher k-NN top-1 after training minus before (percentage points), measured with the setting
# above (torch 2.14.1, CPU, deterministic): see MEASURED; one test image is 0.1 points.
MEASURED = "47.80 -> 61.60 % (+13.8): cmd-fgvc pretrain --epochs 2, 1 thread"
MIN_KNN_GAIN = 8.0
# True marks the test xfail (strict=False) while a setting does not yet clear MIN_KNN_GAIN
LEARNING_NOT_YET_CLEAR = False


def _argv(args: dict[str, object]) -> list[str]:
    argv = []
    for name, value in args.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


@pytest.mark.slow
@pytest.mark.xfail(LEARNING_NOT_YET_CLEAR, strict=False,
                   reason="the setting of LEARNING_TEST_ARGS does not yet clear MIN_KNN_GAIN")
def test_teacher_knn_improves_clearly(tmp_path):
    torch.use_deterministic_algorithms(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [*_argv(LEARNING_TEST_ARGS), "--output_dir", str(tmp_path), "--num_workers", "0", "--no_progress",
                "--device", "cpu", "--logger", "none"]
        result = pretrain.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert result["collapses"] == {} and not any("collapse" in row for row in log), "the teacher collapsed"
    before, after = result["knn"]["before"], result["knn"]["after"]
    assert after - before >= MIN_KNN_GAIN, f"teacher k-NN top-1 {before:.2f} -> {after:.2f} %"
