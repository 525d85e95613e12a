"""MkDocs hook: serve MathJax and mermaid from the built site, so the docs work offline.

The two JavaScript libraries are vendored at build time from the npm registry, at pinned versions
whose tarballs are checked against their pinned sha512 integrity (the value the registry publishes):
``npm pack NAME@VERSION`` fetches each tarball once into a cache folder, and every later build reads
the cache (no network). The files the site needs are added to the build as generated files under
``javascripts/vendor/`` (so ``mkdocs serve`` serves them too), with each library's licence.

- MathJax 3, ``es5/tex-svg.js``: one self-contained file (TeX input, SVG output: no web fonts).
- mermaid 11, ``dist/mermaid.min.js``: Material for MkDocs renders the ``mermaid`` fences with the
  global ``mermaid`` when one is loaded, and only otherwise fetches it from a CDN.

Cache folder: ``$CMD_DOCS_VENDOR_CACHE`` or ``.cache/docs-vendor/`` in the repository (git ignores it).
Without npm, put the two tarballs (``mathjax-3.2.2.tgz``, ``mermaid-11.12.1.tgz``) there by hand.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import NamedTuple

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]


class Package(NamedTuple):
    name: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    files: dict[str, str]  # path in the tarball (under package/) -> path in the site


PACKAGES = (
    Package(
        "mathjax",
        "3.2.2",
        "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw==",
        {"es5/tex-svg.js": "javascripts/vendor/mathjax/tex-svg.js", "LICENSE": "javascripts/vendor/mathjax/LICENSE"},
    ),
    Package(
        "mermaid",
        "11.12.1",
        "sha512-UlIZrRariB11TY1RtTgUWp65tphtBv4CSq7vyS2ZZ2TgoMjs2nloq+wFqxiwcxlhHUvs7DPGgMjs2aeQxz5h9g==",
        {"dist/mermaid.min.js": "javascripts/vendor/mermaid/mermaid.min.js", "LICENSE": "javascripts/vendor/mermaid/LICENSE"},
    ),
)


def cache_dir() -> Path:
    return Path(os.environ.get("CMD_DOCS_VENDOR_CACHE") or ROOT / ".cache" / "docs-vendor")


def _integrity(path: Path) -> str:
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def fetch(package: Package, cache: Path) -> Path:
    """The checked tarball of ``package`` in ``cache``, fetched with ``npm pack`` when missing."""
    tarball = cache / f"{package.name}-{package.version}.tgz"
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise PluginError(
                f"vendoring {package.name} for the docs needs npm (Node.js), or the tarball "
                f"{tarball.name} placed in {cache} by hand"
            )
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [npm, "pack", f"{package.name}@{package.version}", "--pack-destination", str(cache), "--silent"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0 or not tarball.is_file():
            raise PluginError(f"npm pack {package.name}@{package.version} failed:\n{result.stderr[-2000:]}")
    if _integrity(tarball) != package.integrity:
        tarball.unlink()
        raise PluginError(f"{tarball} does not match the pinned integrity of {package.name}@{package.version}")
    return tarball


def extract(package: Package, tarball: Path, cache: Path) -> dict[str, Path]:
    """Extract the files the site needs; returns {site path: file in the cache}."""
    out_dir = cache / f"{package.name}-{package.version}"
    wanted = {src: out_dir / src for src in package.files}
    if not all(p.is_file() for p in wanted.values()):
        with tarfile.open(tarball, "r:gz") as tar:
            for src, dest in wanted.items():
                try:
                    member = tar.extractfile(f"package/{src}")
                except KeyError:
                    member = None
                if member is None:
                    raise PluginError(f"{tarball.name} has no package/{src}")
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(dest.suffix + ".part")
                tmp.write_bytes(member.read())
                tmp.replace(dest)
    return {site: wanted[src] for src, site in package.files.items()}


def on_files(files: Files, config, **kwargs) -> Files:
    cache = cache_dir()
    for package in PACKAGES:
        for site_path, source in extract(package, fetch(package, cache), cache).items():
            files.append(File.generated(config, site_path, abs_src_path=str(source)))
    return files
