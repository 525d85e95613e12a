"""`mkdocs build --strict` passes: no broken link, no unresolved API reference, no docstring warning;
the built site loads no script or stylesheet from another host (MathJax and mermaid are vendored)."""

from __future__ import annotations

import html as html_lib
import importlib.util
import os
import re
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


_TAG = re.compile(r"<(script|link)\b[^>]*>", re.IGNORECASE)
_ATTR = re.compile(r"""\b(src|href|rel)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def external_resources(html: str) -> list[str]:
    """Scripts (``<script src>``) and stylesheets (``<link rel=stylesheet|preload|modulepreload>``)
    of a page that are loaded from another host (``http:``, ``https:`` or protocol-relative ``//``)."""
    found = []
    for tag in _TAG.finditer(html):
        attrs = {k.lower(): v for k, v in _ATTR.findall(tag.group(0))}
        if tag.group(1).lower() == "script":
            url = attrs.get("src", "")
        elif set(attrs.get("rel", "").lower().split()) & {"stylesheet", "preload", "modulepreload"}:
            url = attrs.get("href", "")
        else:
            continue
        if re.match(r"(https?:)?//", url.strip(), re.IGNORECASE):
            found.append(tag.group(0))
    return found


def test_external_resources_finds_cdn_scripts_and_stylesheets():
    html = (
        '<script src="../javascripts/vendor/mermaid/mermaid.min.js"></script>'
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>'
        "<script>var url = 'https://unpkg.com/mermaid@11/dist/mermaid.min.js';</script>"
        '<link rel="stylesheet" href="//fonts.googleapis.com/css?family=Roboto">'
        '<link rel="stylesheet" href="../assets/stylesheets/main.css">'
        '<a href="https://arxiv.org/abs/2401.08860">paper</a>'
    )
    found = external_resources(html)
    assert len(found) == 2 and "jsdelivr" in found[0] and "googleapis" in found[1]


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


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    """The site built once by ``mkdocs build --strict`` (shared by the tests that read it)."""
    missing = _docs_toolchain_missing()
    if missing is not None:
        pytest.skip(f"the docs toolchain is not installed ({missing} missing): pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,  # the griffe extension and `paths: [.]` are relative to the repository root
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return site


def parameter_table(html: str, identifier: str) -> list[list[str]]:
    """The rows (Name, Type, Description, Default: cell texts) of the Parameters table of ``identifier``."""
    start = html.index(f'id="{identifier}"')
    following = re.search(r'<h[1-6][^>]*id="cmd\.', html[start + 10 :])
    section = html[start : start + 10 + following.start()] if following else html[start:]
    match = re.search(r"Parameters.*?(<table[^>]*>.*?</table>)", section, re.S)
    assert match, f"no Parameters table for {identifier}"
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", match.group(1), re.S)
    cell = re.compile(r"<t[dh][^>]*>(.*?)</t[dh]>", re.S)
    return [[html_lib.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in cell.findall(r)] for r in rows]


@pytest.mark.slow
def test_api_parameter_table_has_one_row_per_signature_parameter(built_site):
    """CMDLoss's table on the built losses page: every parameter once, in order, with its default.

    Its docstring documents several parameters in one entry (``out_dim: K. n_global_crops: G ...``)
    and joint ones (``image_weight, region_weight, ...: lambda_I, lambda_R, ...``)."""
    import inspect

    from cmd.losses import CMDLoss

    rows = parameter_table((built_site / "api" / "losses" / "index.html").read_text(), "cmd.losses.CMDLoss")
    assert rows[0] == ["Name", "Type", "Description", "Default"]
    signature = [p for p in inspect.signature(CMDLoss).parameters.values()]
    assert [r[0] for r in rows[1:]] == [p.name for p in signature]
    for row, p in zip(rows[1:], signature):
        want = "required" if p.default is inspect.Parameter.empty else repr(p.default)
        assert row[3] == want, (p.name, row)
        assert row[2], f"{p.name}: no description"
    described = {r[0]: r[2] for r in rows[1:]}
    assert described["n_local_crops"].startswith("L") and described["region_weight"] == "lambda_R."


def test_griffe_extension_one_entry_per_signature_parameter():
    pytest.importorskip("griffe", reason="the docs extra (griffe) is not installed")
    normalise = _load_extension().normalise_parameters
    text = ("Summary.\n\nArgs:\n    out_dim: K. n_global_crops: G (first). n_local_crops: L.\n"
            "    a, b: lambda_A, lambda_B.\n    t1, t2: the temperature\n        (a schedule, DINO's). tau: s.\n\n"
            "Returns:\n    x, y: kept.\n")
    params = ["out_dim", "n_global_crops", "n_local_crops", "t1", "t2", "tau", "a", "b", "extra"]
    assert normalise(text, params) == (
        "Summary.\n\nArgs:\n    out_dim: K.\n    n_global_crops: G (first).\n    n_local_crops: L.\n"
        "    t1: the temperature (a schedule, DINO's).\n    t2: the temperature (a schedule, DINO's).\n"
        "    tau: s.\n    a: lambda_A.\n    b: lambda_B.\n    extra: see above.\n\nReturns:\n    x, y: kept.\n"
    )


@pytest.mark.slow
def test_mkdocs_build_strict(built_site):
    site = built_site
    assert (site / "index.html").is_file()
    api = (site / "api" / "losses" / "index.html").read_text()
    assert 'id="cmd.losses.CMDLoss"' in api  # griffe documented this package, not the stdlib's cmd

    import cmd

    pages = "".join(p.read_text() for p in (site / "api").rglob("*.html"))
    undocumented = [f"cmd.{m}.{n}" for n, m in cmd._LAZY_ATTRS.items() if f'id="cmd.{m}.{n}"' not in pages]
    assert not undocumented, f"no API entry rendered for {undocumented}"

    # Offline: every script and stylesheet comes from the site itself, MathJax and mermaid included.
    html_pages = sorted(site.rglob("*.html"))
    external = {str(p.relative_to(site)): external_resources(p.read_text()) for p in html_pages}
    external = {page: tags for page, tags in external.items() if tags}
    assert not external, f"pages load scripts or stylesheets from another host: {external}"
    css_external = [
        str(p.relative_to(site))
        for p in site.rglob("*.css")
        if re.search(r"""(@import\s+(url\()?|url\()\s*["']?(https?:)?//""", p.read_text(errors="replace"))
    ]
    assert not css_external, f"stylesheets import or load from another host: {css_external}"
    vendored = ("javascripts/vendor/mathjax/tex-svg.js", "javascripts/vendor/mermaid/mermaid.min.js")
    for path in vendored:
        assert (site / path).stat().st_size > 100_000, f"{path} is missing from the built site"
    concepts = (site / "concepts" / "index.html").read_text()
    assert all(path in concepts for path in vendored), "a page does not load the vendored MathJax / mermaid"
    assert 'class="mermaid"' in concepts and 'class="arithmatex"' in concepts

    # Sphinx roles would print literally in the API reference: docstrings use mkdocstrings cross-references.
    roles = sorted(set(re.findall(r":(?:class|func|meth|attr|mod|exc|obj|data):(?:`|<code>)[^<`]*", pages)))
    assert not roles, f"Sphinx roles printed literally in the API reference: {roles}"


def _load_vendor_hook():
    spec = importlib.util.spec_from_file_location("docs_vendor_js", ROOT / "docs" / "_hooks" / "vendor_js.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vendor_hook_checks_integrity_and_extracts(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")
    import io
    import tarfile

    from mkdocs.exceptions import PluginError

    hook = _load_vendor_hook()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("package/dist/lib.js", b"var lib = 1;"), ("package/LICENSE", b"MIT")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tarball = tmp_path / "lib-1.0.0.tgz"
    tarball.write_bytes(buf.getvalue())
    good = hook.Package("lib", "1.0.0", hook._integrity(tarball), {"dist/lib.js": "javascripts/vendor/lib.js"})
    assert hook.fetch(good, tmp_path) == tarball  # cached and intact: no npm call
    files = hook.extract(good, tarball, tmp_path)
    assert files["javascripts/vendor/lib.js"].read_bytes() == b"var lib = 1;"
    missing = good._replace(files={"dist/other.js": "x.js"})
    with pytest.raises(PluginError, match="no package/dist/other.js"):
        hook.extract(missing, tarball, tmp_path)
    tampered = good._replace(integrity="sha512-" + "A" * 86 + "==")
    with pytest.raises(PluginError, match="integrity"):
        hook.fetch(tampered, tmp_path)
    assert not tarball.exists()  # a tarball that fails the check is removed, to be fetched again
    assert all(p.integrity.startswith("sha512-") for p in hook.PACKAGES)
