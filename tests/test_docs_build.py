"""`mkdocs build --strict` passes: no broken link, no unresolved API reference, no docstring warning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "docs" / "_griffe" / "docstring_sections.py"


def _docs_toolchain_missing() -> str | None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


def _load_extension():
    spec = importlib.util.spec_from_file_location("docs_griffe_sections", EXTENSION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_griffe_extension_splits_joint_parameters():
    pytest.importorskip("griffe", reason="the docs extra (griffe) is not installed")
    split = _load_extension().split_joint_parameters
    text = "Summary.\n\nArgs:\n    a, b: shared.\n        more.\n    c: alone.\n\nReturns:\n    x, y: kept.\n"
    assert split(text) == (
        "Summary.\n\nArgs:\n    a: shared.\n        more.\n    b: shared.\n        more.\n    c: alone.\n\n"
        "Returns:\n    x, y: kept.\n"
    )
    wrapped = "Args:\n    a, b,\n    c: three.\n    d: one.\n"
    assert split(wrapped) == "Args:\n    a: three.\n    b: three.\n    c: three.\n    d: one.\n"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = _docs_toolchain_missing()
    if missing is not None:
        pytest.skip(f"the docs toolchain is not installed ({missing} missing): pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
        cwd=ROOT,  # the griffe extension and `paths: [.]` are relative to the repository root
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    site = tmp_path / "site"
    assert (site / "index.html").is_file()
    api = (site / "api" / "losses" / "index.html").read_text()
    assert 'id="cmd.losses.CMDLoss"' in api  # griffe documented this package, not the stdlib's cmd

    import cmd

    pages = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    undocumented = [f"cmd.{m}.{n}" for n, m in cmd._LAZY_ATTRS.items() if f'id="cmd.{m}.{n}"' not in pages]
    assert not undocumented, f"no API entry rendered for {undocumented}"
