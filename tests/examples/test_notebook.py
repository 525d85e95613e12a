"""examples/quickstart.ipynb runs end to end (nbclient, tiny settings), in a kernel of this environment.

The notebook keeps all its settings in one cell; the test injects a cell right after it that
shrinks them, and checks inside the kernel that ``import cmd`` is this repository's package (the
import-precedence hook works in a Jupyter kernel too, not only in plain ``python``).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
KERNEL_NAME = "python3"

# A few steps on tiny images with a one-block ViT: a couple of seconds of compute. The notebook's
# other settings are the training program's defaults (read from cmd.cli.options).
TINY = {
    "NUM_THREADS": 1,
    "N_CLASSES": 4,
    "N_PER_CLASS": 8,
    "IMAGE_SIZE": 32,
    "GLOBAL_SIZE": 32,
    "LOCAL_SIZE": 16,
    "N_LOCAL": 2,
    "ARCH": "vit_tiny",
    "BACKBONE_KWARGS": {"depth": 1, "embed_dim": 48, "num_heads": 3, "patch_size": 8},
    "OUT_DIM": 64,
    "HEAD_HIDDEN_DIM": 32,
    "HEAD_BOTTLENECK_DIM": 16,
    "EPOCHS": 2,
    "BATCH_SIZE": 8,
    "KNN_K": 5,
    "N_SHOW": 4,
}


def _settings_cell_index(nb) -> int:
    """The first code cell that assigns every setting the test overrides."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        targets = re.findall(r"^([A-Z][A-Z0-9_, ]*)=", cell.source, flags=re.M)  # NAME = / A, B =
        assigned = {name for target in targets for name in re.split(r"[,\s]+", target) if name}
        if set(TINY) <= assigned:
            return i
    raise AssertionError(f"no code cell of {NOTEBOOK.name} defines all of {sorted(TINY)}")


def _override_cell(expected_cmd: Path, output_dir: Path) -> nbformat.NotebookNode:
    lines = [f"{name} = {value!r}" for name, value in {**TINY, "OUTPUT_DIR": str(output_dir)}.items()]
    lines += [
        "import sys as _sys",
        "from pathlib import Path as _Path",
        "import cmd as _cmd",
        f"_expected = _Path({str(expected_cmd)!r}).resolve()",
        "assert _Path(_cmd.__file__).resolve() == _expected, (_cmd.__file__, str(_expected))",
        "assert hasattr(_cmd, 'CMDLoss') and hasattr(_cmd, 'Cmd')  # this package, stdlib API kept",
        "print('KERNEL ' + __import__('json').dumps({'cmd': _cmd.__file__, 'prefix': _sys.prefix}))",
    ]
    return nbformat.v4.new_code_cell("\n".join(lines))


def _install_kernelspec(root: Path) -> None:
    """A ``python3`` kernelspec running this interpreter (the venv's), found first via JUPYTER_PATH."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (cmd-fgvc test)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in nb.cells:  # the committed notebook carries no outputs
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "clear the notebook's outputs"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 5

    index = _settings_cell_index(nb)
    pictures = tmp_path / "pictures"
    nb.cells.insert(index + 1, _override_cell(REPO / "cmd" / "__init__.py", pictures))

    jupyter_dir = tmp_path / "jupyter"
    _install_kernelspec(jupyter_dir)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.delenv("CMD_FGVC_DISABLE_IMPORT_HOOK", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel picks the inline backend
    # One thread: on a busy shared machine, OpenMP threads that outnumber the free cores slow tiny
    # ops down by orders of magnitude (the augmentations run in the kernel process).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "work"
    work.mkdir()

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=120,
        startup_timeout=60,
        resources={"metadata": {"path": str(work)}},
    )
    client.execute()

    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells if cell.cell_type == "code"
        for out in cell.outputs if out.output_type == "stream"
    )
    kernel = json.loads(re.search(r"^KERNEL (\{.*\})$", text, flags=re.M).group(1))
    assert Path(kernel["cmd"]).resolve() == (REPO / "cmd" / "__init__.py").resolve()
    assert Path(kernel["prefix"]).resolve() == Path(sys.prefix).resolve()

    assert re.search(r"epoch 2/2\s+loss [0-9.]+", text), text[-2000:]
    assert re.search(r"teacher k-NN top-1 before training: [0-9.]+ %, after: [0-9.]+ % \([+-][0-9.]+ points", text)
    assert re.search(r"knn_top1@5\s+[0-9.]+\s+[0-9.]+", text), text[-2000:]
    assert "collapse diagnosis at the last step:" in text
    assert "uniform baseline" in text
    images = [
        out for cell in nb.cells if cell.cell_type == "code"
        for out in cell.outputs if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 5, f"expected the notebook's figures inline, got {len(images)}"
    for picture in ("collapse_signals.png", "region_weights.png", "embedding.png"):
        assert (pictures / picture).stat().st_size > 1000, picture
    assert not any(work.iterdir()), f"the notebook wrote into its working directory: {list(work.iterdir())}"
