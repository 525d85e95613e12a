"""Give the installed ``cmd`` package (cmd-fgvc) precedence over the standard library's ``cmd`` module.

The standard library's folder comes before site-packages on ``sys.path``, so a plainly installed
package named ``cmd`` would never be imported. This module is imported once at interpreter start-up
by ``cmd_fgvc.pth`` (or called through ``cmd_fgvc.start`` on Python 3.15+, PEP 829) and puts a tiny
finder at the front of ``sys.meta_path``. The finder answers for the top-level name ``cmd`` only
(submodules are then found through the package's ``__path__`` as usual), and only with a ``cmd``
package that is this project's (it contains ``_stdlib_compat.py``). On any error it returns None so
the import falls back to the standard library: a broken install never breaks Python start-up.

The same mechanism setuptools uses for its bundled distutils (``distutils-precedence.pth``).
Set ``CMD_FGVC_DISABLE_IMPORT_HOOK=1`` to turn it off. ``sys.path`` is never reordered.
"""

import os
import sys

DISABLE_ENV = "CMD_FGVC_DISABLE_IMPORT_HOOK"
_MARKER = "_stdlib_compat.py"


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _candidate_dirs():
    # Wheel install: the package sits beside this module in site-packages.
    yield os.path.dirname(os.path.abspath(__file__))
    # Editable install (or any other layout): the first sys.path entry holding our package.
    for entry in sys.path:
        if isinstance(entry, str):
            yield entry or os.getcwd()


def _find_package_dir():
    """Return the folder of this project's ``cmd`` package that the normal search order would pick."""
    first = None
    for i, base in enumerate(_candidate_dirs()):
        pkg = os.path.join(base, "cmd")
        if os.path.isfile(os.path.join(pkg, "__init__.py")) and os.path.isfile(os.path.join(pkg, _MARKER)):
            if i == 0:
                first = pkg  # the installed copy; a sys.path entry listed earlier still wins
                continue
            return pkg
    return first


class CmdPrecedenceFinder:
    """A meta path finder that answers only for the top-level module name ``cmd``."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "cmd" or path is not None:
            return None
        try:
            if _disabled():
                return None
            pkg = _find_package_dir()
            if pkg is None:
                return None
            from importlib.util import spec_from_file_location

            return spec_from_file_location(
                "cmd", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg]
            )
        except Exception:
            return None

    @classmethod
    def invalidate_caches(cls):
        return None


def install() -> None:
    """Insert the finder at the front of ``sys.meta_path`` (idempotent; never raises)."""
    try:
        if _disabled():
            return
        for finder in sys.meta_path:
            if getattr(finder, "__name__", None) == "CmdPrecedenceFinder":
                return
        sys.meta_path.insert(0, CmdPrecedenceFinder)
    except Exception:
        pass
