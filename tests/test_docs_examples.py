"""The documentation's code examples run, and the API reference names every public name.

A fenced ```python block preceded by the HTML comment ``<!-- runnable -->`` (blank lines allowed in
between) is *runnable*. The runnable blocks of one page (``docs/**/*.md`` and ``README.md``) run in
order in one namespace, fresh for every page, in a temporary working directory, inside a worker
process that serves all pages (so torch and timm are imported once).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGE_TIMEOUT_S = 300

RUNNABLE_MARK = "<!-- runnable -->"
_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass
class CodeBlock:
    path: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str
    runnable: bool


def extract_blocks(text: str, path: Path = Path("<string>")) -> list[CodeBlock]:
    """Every fenced code block of a Markdown text, with whether it is marked runnable.

    A fence closes on a line with the same fence character, at least as long, and nothing else.
    Indented fences (inside admonitions or lists) are dedented.
    """
    lines = text.split("\n")
    blocks: list[CodeBlock] = []
    previous_nonblank = ""
    i = 0
    while i < len(lines):
        match = _FENCE_OPEN.match(lines[i])
        if match is None:
            if lines[i].strip():
                previous_nonblank = lines[i].strip()
            i += 1
            continue
        fence = match["fence"]
        info = match["info"].strip()
        language = info.split()[0].lower().lstrip(".{") if info else ""
        close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        start = i + 1
        j = start
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: code fence {fence!r} is never closed")
        code = textwrap.dedent("\n".join(lines[start:j]))
        blocks.append(CodeBlock(path, start + 1, language, code, previous_nonblank == RUNNABLE_MARK))
        previous_nonblank = ""
        i = j + 1
    return blocks


def markdown_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


def runnable_pages() -> list[Path]:
    return [p for p in markdown_pages() if any(b.runnable for b in extract_blocks(p.read_text(), p))]


# One worker process runs the pages one after the other, each in a fresh namespace and a fresh working
# directory, so torch, timm and the library are imported once for all pages. The protocol: one JSON
# line per page on stdin; the answer is one line on stdout that starts with _MARK (anything else the
# examples print is captured by the worker and returned in the answer).
_MARK = "@@docs-example-result@@"
_WORKER = r"""
import contextlib, gc, io, json, os, sys, traceback
import matplotlib
matplotlib.use("Agg")
MARK = sys.argv[1]
protocol = sys.stdout
for line in sys.stdin:
    request = json.loads(line)
    os.chdir(request["cwd"])
    namespace = {"__name__": "__main__"}
    captured = io.StringIO()
    result = {"ok": True, "failed_at": None, "error": ""}
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        for block in request["blocks"]:
            label = f"{block['path']}:{block['line']}"
            try:
                exec(compile(block["code"], label, "exec"), namespace)
            except BaseException:
                result.update(ok=False, failed_at=label, error=traceback.format_exc())
                break
    del namespace
    gc.collect()
    result["output"] = captured.getvalue()
    protocol.write(MARK + json.dumps(result) + "\n")
    protocol.flush()
"""


@dataclass
class PageResult:
    ok: bool
    failed_at: str | None
    error: str
    output: str

    def report(self) -> str:
        return f"runnable block {self.failed_at} failed:\n{self.error[-6000:]}\n--- output ---\n{self.output[-3000:]}"


class ExampleRunner:
    """A worker process that runs the runnable blocks of one page at a time, in a fresh namespace."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER, _MARK],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def run(self, blocks: list[CodeBlock], cwd: Path, timeout: float = PAGE_TIMEOUT_S) -> PageResult:
        if self._process is None or self._process.poll() is not None:
            self._process = self._start()
        process = self._process
        request = {
            "cwd": str(cwd),
            "blocks": [{"path": _relative(b.path), "line": b.line, "code": b.code} for b in blocks],
        }
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        stray: list[str] = []
        answer: list[str] = []

        def read() -> None:
            for line in process.stdout:
                if line.startswith(_MARK):
                    answer.append(line[len(_MARK) :])
                    return
                stray.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not answer:
            self.close()  # a crash or a hang: the next page gets a new worker
            why = "timed out" if reader.is_alive() else "the worker died"
            return PageResult(False, _relative(blocks[0].path), f"{why} after {timeout} s", "".join(stray))
        result = json.loads(answer[0])
        return PageResult(result["ok"], result["failed_at"], result["error"], "".join(stray) + result["output"])

    def close(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


@pytest.fixture(scope="module")
def runner():
    worker = ExampleRunner()
    yield worker
    worker.close()


# ----------------------------------------------------------------------------- the extractor


def test_extract_blocks_marks_only_the_block_after_the_comment():
    text = "\n".join(
        [
            "# Page",
            "<!-- runnable -->",
            "",
            "```python",
            "x = 1",
            "```",
            "text",
            "```python",
            "y = 2",
            "```",
            "!!! note",
            "    <!-- runnable -->",
            "    ```python",
            "    z = 3",
            "    ```",
            "````markdown",
            "```python",
            "not a block",
            "```",
            "````",
        ]
    )
    blocks = extract_blocks(text)
    assert [(b.language, b.code, b.runnable) for b in blocks] == [
        ("python", "x = 1", True),
        ("python", "y = 2", False),
        ("python", "z = 3", True),
        ("markdown", "```python\nnot a block\n```", False),
    ]
    assert blocks[0].line == 5


def test_extract_blocks_rejects_an_unclosed_fence():
    with pytest.raises(ValueError, match="never closed"):
        extract_blocks("```python\nx = 1\n")


def test_runner_shares_a_namespace_within_a_page_and_reports_the_failing_block(runner, tmp_path):
    blocks = [
        CodeBlock(ROOT / "docs" / "x.md", 3, "python", "a = 41\nprint('hello')", True),
        CodeBlock(ROOT / "docs" / "x.md", 9, "python", "assert a == 42, 'shared namespace'", True),
    ]
    result = runner.run(blocks, tmp_path)
    assert not result.ok and result.failed_at == "docs/x.md:9"
    assert "shared namespace" in result.error and "hello" in result.output
    # the next page starts from a fresh namespace, in its own working directory
    fresh = [CodeBlock(ROOT / "docs" / "y.md", 1, "python", "import os\nassert 'a' not in dir()\nprint(os.getcwd())", True)]
    result = runner.run(fresh, tmp_path)
    assert result.ok, result.report()
    assert str(tmp_path) in result.output


def test_runner_survives_a_page_that_exits(runner, tmp_path):
    exiting = [CodeBlock(ROOT / "docs" / "z.md", 1, "python", "raise SystemExit(3)", True)]
    assert not runner.run(exiting, tmp_path).ok
    assert runner.run([CodeBlock(ROOT / "docs" / "z.md", 5, "python", "x = 1", True)], tmp_path).ok


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_runnable_mark_precedes_a_python_block(page):
    text = page.read_text()
    blocks = extract_blocks(text, page)
    marks = sum(1 for line in text.split("\n") if line.strip() == RUNNABLE_MARK)
    runnable = [b for b in blocks if b.runnable]
    assert len(runnable) == marks, f"{page}: a {RUNNABLE_MARK} comment is not followed by a code block"
    assert all(b.language == "python" for b in runnable), f"{page}: only python blocks can be runnable"


def test_the_docs_have_runnable_examples():
    pages = {p.relative_to(ROOT).as_posix() for p in runnable_pages()}
    assert "docs/index.md" in pages
    assert len(pages) >= 5, pages


# ----------------------------------------------------------------------------- the API reference


def _api_directives() -> set[str]:
    found = set()
    for page in (DOCS / "api").glob("*.md"):
        found.update(re.findall(r"^:::\s+([\w.]+)\s*$", page.read_text(), flags=re.MULTILINE))
    return found


def test_api_reference_documents_every_public_name():
    import cmd

    directives = _api_directives()
    missing = [
        f"::: cmd.{module}.{name}"
        for name, module in cmd._LAZY_ATTRS.items()
        if f"cmd.{module}.{name}" not in directives
    ]
    assert not missing, f"add to docs/api/*.md: {missing}"


def test_api_reference_mentions_every_name_of_all():
    import cmd

    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    missing = [name for name in cmd.__all__ if not re.search(rf"\b{re.escape(name)}\b", text)]
    assert not missing, f"docs/api/*.md never mention {missing}"


# ----------------------------------------------------------------------------- the examples


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_examples(page, runner, tmp_path):
    blocks = [b for b in extract_blocks(page.read_text(), page) if b.runnable]
    result = runner.run(blocks, tmp_path)
    assert result.ok, result.report()
