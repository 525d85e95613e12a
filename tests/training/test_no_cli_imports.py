"""Nothing but the command imports the command: the library, the examples and the benchmarks use cmd.training.

Every ``import`` of ``cmd.cli`` (``import cmd.cli...``, ``from cmd.cli... import``, ``from cmd import
cli``) in the library (except ``cmd/cli`` and ``cmd/__main__.py``), the minimal example, the
notebook's code cells and the benchmarks is reported with its file and line.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what measures the command itself calls it (its bare loop is built from cmd.training, like everyone's)
MEASURES_THE_COMMAND = {"benchmarks/bench_program.py"}


def _cli_imports(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "cmd.cli" or n.startswith("cmd.cli.") for n in names):
            lines.append(node.lineno)
    return lines


def _sources() -> dict[str, str]:
    files = [p for p in (REPO / "cmd").rglob("*.py") if "cli" not in p.relative_to(REPO / "cmd").parts[:1]]
    files = [p for p in files if p.name != "__main__.py" or p.parent != REPO / "cmd"]
    files += [REPO / "examples" / "train_cmd_minimal.py", *sorted((REPO / "benchmarks").rglob("*.py"))]
    out = {str(p.relative_to(REPO)): p.read_text() for p in files}
    out = {name: text for name, text in out.items() if name not in MEASURES_THE_COMMAND}
    notebook = json.loads((REPO / "examples" / "quickstart.ipynb").read_text())
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            code = "".join(cell["source"])
            code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
            out[f"examples/quickstart.ipynb cell {i}"] = code
    return out


def test_the_detector_sees_every_form():
    assert _cli_imports("import cmd.cli.pretrain\nfrom cmd.cli import pretrain\nfrom cmd import cli\n"
                        "from cmd.cli.options import parse_pretrain_args\nimport cmd\nfrom cmd import training") \
        == [1, 2, 3, 4]


def test_nothing_outside_the_command_imports_cmd_cli():
    sources = _sources()
    assert any(name.startswith("cmd/training/") for name in sources)
    offenders = [f"{name}:{line}" for name, text in sources.items() for line in _cli_imports(text)]
    assert not offenders, "imports of cmd.cli outside the command: " + ", ".join(offenders)
