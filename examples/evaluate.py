"""`python examples/evaluate.py ...` runs the installed ``cmd-fgvc evaluate`` command (same options).

The program itself lives in the package (`cmd/cli/evaluate.py`), so ``pip install cmd-fgvc`` brings it
without a clone of the repository; this file keeps old command lines, docs and scripts working.
See ``cmd-fgvc evaluate --help``.
"""

import sys

from cmd.cli.evaluate import *  # noqa: F403  (the program's functions, for scripts that import this file)
from cmd.cli.evaluate import run

if __name__ == "__main__":
    sys.exit(run())
