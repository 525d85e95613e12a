"""Probe (issue 23): the training program with the multi-crop blur's std scaled by $BLUR_SCALE.

DINO blurs with a std of 0.1-2 px at 224 / 96 px crops; ``BLUR_SCALE=0.142857`` gives the same blur
relative to the demo's 32 px crops. A monkeypatch of ``cmd.transforms._BLUR_SIGMA``, not an option of
the program. The arguments are those of ``cmd-fgvc pretrain``::

    BLUR_SCALE=0.142857 OMP_NUM_THREADS=1 PYTHONPATH=$PWD python docs/learning_regime_scripts/blur_probe.py \\
        --knn_every 1 --no_progress --output_dir /tmp/seeds/blur7_s1 --seed 1
"""

import os
import sys

import cmd.transforms

scale = float(os.environ.get("BLUR_SCALE", "1"))
cmd.transforms._BLUR_SIGMA = (0.1 * scale, 2.0 * scale)  # read when the augmentation is built

from cmd.cli import pretrain  # noqa: E402

pretrain.main(sys.argv[1:])
