"""The standard library's ``cmd`` module, loaded from its own file.

This package takes the import name ``cmd``, which the standard library also uses (``pdb`` does
``import cmd`` and subclasses ``cmd.Cmd``). To keep ``pdb``, ``breakpoint()`` and every other user of
the stdlib module working, ``cmd/__init__.py`` re-exports the stdlib module's public API, loaded here
from the stdlib's own ``cmd.py`` without touching ``sys.modules``. Only the standard library is
imported, so this stays cheap.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from types import ModuleType

STDLIB_NAMES = ("Cmd", "PROMPT", "IDENTCHARS")


def _stdlib_cmd_path() -> str:
    candidates = [sysconfig.get_paths().get("stdlib", "")]
    # Fall back on the folder of a module that is always in the stdlib (e.g. venvs, odd layouts).
    candidates.append(os.path.dirname(os.__file__))
    for folder in candidates:
        path = os.path.join(folder, "cmd.py")
        if folder and os.path.isfile(path):
            return path
    raise ImportError("cmd-fgvc: could not find the standard library's cmd.py to re-export Cmd")


def load_stdlib_cmd() -> ModuleType:
    """Execute the standard library's ``cmd.py`` as a module object that is not put in ``sys.modules``.

    The module is named ``cmd``, so ``Cmd.__module__ == "cmd"`` as with the plain stdlib, which
    resolves to this package (it re-exports ``Cmd``).
    """
    path = _stdlib_cmd_path()
    spec = importlib.util.spec_from_file_location("cmd", path)
    if spec is None or spec.loader is None:  # pragma: no cover - defensive
        raise ImportError(f"cmd-fgvc: cannot load the standard library's cmd module from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stdlib_cmd = load_stdlib_cmd()
Cmd = stdlib_cmd.Cmd
PROMPT = stdlib_cmd.PROMPT
IDENTCHARS = stdlib_cmd.IDENTCHARS
