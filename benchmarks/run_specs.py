"""``NAME=DIR`` run specifications of the benchmark scripts that read finished runs of ``cmd-fgvc pretrain``.

A ``DIR`` with ``*``, ``?`` or ``[`` is a pattern: every folder it matches that holds the file a run
must have (``log.jsonl``) is a run named ``NAME/PATH``, PATH its path below the pattern's fixed
folders; the matched folders without that file (e.g. `compare_presets.py`'s supervised reference) are
returned apart. A trailing ``!`` or ``~`` of NAME (a mark of `collapse_calibration.py`) is kept at
the end of every name. ::

    >>> expand("demo/seed0=/tmp/run")
    ([('demo/seed0', PosixPath('/tmp/run'))], [])
"""

from __future__ import annotations

import glob
from pathlib import Path

GLOB_CHARS = "*?["
MARKS = "!~"


def expand(spec: str, required: str = "log.jsonl") -> tuple[list[tuple[str, Path]], list[str]]:
    """``NAME=DIR`` -> the runs it names ([(name, folder)]) and the folders a pattern matched without ``required``.

    Raises:
        ValueError: not ``NAME=DIR``, or a pattern that matches no folder holding ``required``.
    """
    name, _, folder = spec.partition("=")
    if not name or not folder:
        raise ValueError(f"--runs: expected NAME=DIR, got {spec!r}")
    if not any(c in folder for c in GLOB_CHARS):
        return [(name, Path(folder))], []
    base = name.rstrip(MARKS)
    mark = name[len(base):]
    parts = Path(folder).parts  # a run is named by its path below the pattern's fixed folders
    fixed = Path(*parts[: next(i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS))] or ["."])
    matched = sorted(Path(p) for p in glob.glob(folder) if Path(p).is_dir())
    runs = [(f"{base}/{p.relative_to(fixed).as_posix()}{mark}", p) for p in matched if (p / required).is_file()]
    if not runs:
        raise ValueError(f"--runs {spec!r}: the pattern matches no folder with a {required}")
    return runs, [str(p) for p in matched if not (p / required).is_file()]


def expand_all(specs: list[str], required: str = "log.jsonl") -> tuple[list[tuple[str, Path]], list[str]]:
    """Every spec expanded, in order; ValueError when two runs share a name (the marks aside)."""
    runs: list[tuple[str, Path]] = []
    skipped: list[str] = []
    for spec in specs:
        named, without = expand(spec, required)
        runs += named
        skipped += without
    names = [name.rstrip(MARKS) for name, _ in runs]
    if len(set(names)) < len(names):
        raise ValueError(f"--runs: two runs share a name: {sorted({n for n in names if names.count(n) > 1})}")
    return runs, skipped
