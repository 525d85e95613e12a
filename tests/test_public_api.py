"""The lazy public API: ``import cmd`` is cheap, every advertised name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cmd


def _run(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, cwd="/", timeout=120
    )


def test_import_cmd_does_not_import_torch():
    proc = _run("import cmd, sys; print('torch' in sys.modules)", "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line]
    assert not [m for m in imported if m.split(".")[0] in ("torch", "numpy", "timm", "faiss")], imported


def test_torch_backed_name_imports_on_first_access():
    proc = _run("import cmd, sys; cmd.CMDLoss; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_stdlib_names_come_first():
    assert cmd.__all__[:3] == ["Cmd", "PROMPT", "IDENTCHARS"]
    import pdb

    assert issubclass(pdb.Pdb, cmd.Cmd)


@pytest.mark.parametrize("name", [n for n in cmd.__all__ if n not in ("__version__",)])
def test_every_public_name_resolves(name: str):
    value = getattr(cmd, name)
    assert value is not None
    if not isinstance(value, type(sys)) and callable(value):
        assert value.__doc__, f"cmd.{name} has no docstring"


def test_from_import_and_dir():
    from cmd import CrossLevelOutput  # noqa: F401

    listing = dir(cmd)
    for name in ("CMDLoss", "MultiInstancePooling", "Cmd", "losses"):
        assert name in listing


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        cmd.definitely_not_a_name  # noqa: B018
    assert not hasattr(cmd, "another_missing_name")
