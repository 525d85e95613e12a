"""The standard library's ``cmd`` module, loaded from its own file.

This package takes the import name ``cmd``, which the standard library also uses (``pdb`` does
``import cmd`` and subclasses ``cmd.Cmd``). To keep ``pdb``, ``breakpoint()`` and every other user of
the stdlib module working, ``cmd/__init__.py`` re-exports the stdlib module's public API, loaded here
from the stdlib's own ``cmd.py`` without touching ``sys.modules``. Only the standard library is
imported, so this stays cheap.
"""

from __future__ import annotations

import os
import sys
from importlib.machinery import ModuleSpec, SourceFileLoader
from types import ModuleType

STDLIB_NAMES = ("Cmd", "PROMPT", "IDENTCHARS")


def _stdlib_cmd_path() -> str:
    # The folder of a module that is always in the stdlib; sysconfig as a fallback (slower to import).
    candidates = [os.path.dirname(os.__file__)]
    if "sysconfig" in sys.modules or not os.path.isfile(os.path.join(candidates[0], "cmd.py")):
        import sysconfig

        candidates.append(sysconfig.get_paths().get("stdlib", ""))
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
    loader = SourceFileLoader("cmd", path)
    module = ModuleType("cmd")
    module.__file__ = path
    module.__loader__ = loader
    module.__spec__ = ModuleSpec("cmd", loader, origin=path)
    loader.exec_module(module)
    return module


stdlib_cmd = load_stdlib_cmd()
Cmd = stdlib_cmd.Cmd
PROMPT = stdlib_cmd.PROMPT
IDENTCHARS = stdlib_cmd.IDENTCHARS
