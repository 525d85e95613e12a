"""`python examples/pretrain.py ...` runs the installed ``cmd-fgvc pretrain`` command (same options).

The program itself lives in the package (`cmd/cli/pretrain.py`), so ``pip install cmd-fgvc`` brings it
without a clone of the repository; this file keeps old command lines, docs and scripts working.
See ``cmd-fgvc pretrain --help``.
"""

import sys

from cmd.cli.pretrain import *  # noqa: F403  (the program's functions, for scripts that import this file)
from cmd.cli.pretrain import run

if __name__ == "__main__":
    sys.exit(run())
