"""``python -m cmd COMMAND ...``: the ``cmd-fgvc`` console command (see `cmd.cli`)."""

import sys

from cmd.cli import main

sys.exit(main())
