"""Installing cmd-fgvc makes ``import cmd`` reach this package, and never breaks the stdlib ``cmd``.

Every check runs in a subprocess of a *fresh* virtual environment, from a neutral working directory,
as a new user would. The fresh environments see the test environment's site-packages (for torch and
the build backend) through a plain path entry, which adds directories but runs none of their
``.pth`` files, so only the fresh environment's own install of cmd-fgvc is in effect.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB_CMD = os.path.join(sysconfig.get_paths()["stdlib"], "cmd.py")

pytestmark = [pytest.mark.install, pytest.mark.slow]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "CMD_FGVC", "PYTEST"))}
    env.update(extra)
    return env


class FreshEnv:
    """A new virtual environment with only cmd-fgvc installed (plus access to the outer packages)."""

    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        venv.EnvBuilder(with_pip=False, clear=True).create(self.venv)
        self.python = str(self.venv / "bin" / "python")
        self.site = Path(
            self.run("import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        )
        outer = sysconfig.get_paths()["purelib"]
        (self.site / "zz_outer_site_packages.pth").write_text(outer + "\n")
        self.workdir = root / "work"
        self.workdir.mkdir()

    def run(self, code: str, *args: str, stdin: str | None = None, env: dict | None = None, check=True):
        proc = subprocess.run(
            [self.python, *args, "-c", code] if code else [self.python, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=str(getattr(self, "workdir", self.root)),
            env=env or _clean_env(),
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def pip(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", self.python, "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=600,
        )
        if proc.returncode != 0:
            raise AssertionError(f"pip {' '.join(args)} failed\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        env=_clean_env(),
        timeout=600,
    )
    (whl,) = out.glob("cmd_fgvc-*.whl")
    return whl


@pytest.fixture(scope="module", params=["wheel", "editable"])
def installed(request, tmp_path_factory) -> FreshEnv:
    env = FreshEnv(tmp_path_factory.mktemp(f"fresh-{request.param}"))
    if request.param == "wheel":
        env.pip("install", "--no-deps", "--no-index", str(request.getfixturevalue("wheel")))
    else:
        env.pip("install", "--no-deps", "--no-build-isolation", "-e", str(REPO))
    env.kind = request.param
    return env


def _expected_init(env: FreshEnv) -> str:
    if env.kind == "wheel":
        return str(env.site / "cmd" / "__init__.py")
    return str(REPO / "cmd" / "__init__.py")


def test_import_cmd_reaches_package(installed: FreshEnv):
    out = installed.run("import cmd; print(cmd.__file__); print(cmd.__version__)").stdout.split()
    assert out[0] == _expected_init(installed)
    assert out[1]


def test_startup_prints_nothing(installed: FreshEnv):
    proc = installed.run("pass")
    assert proc.stdout == "" and proc.stderr == ""


def test_stdlib_api_is_reexported(installed: FreshEnv):
    code = textwrap.dedent(
        f"""
        import pdb, cmd
        assert cmd.Cmd is pdb.cmd.Cmd
        assert issubclass(pdb.Pdb, cmd.Cmd)
        assert cmd.Cmd.do_help.__code__.co_filename == {STDLIB_CMD!r}, cmd.Cmd.do_help.__code__.co_filename
        assert cmd.PROMPT == "(Cmd) " and "_" in cmd.IDENTCHARS
        print("ok")
        """
    )
    assert installed.run(code).stdout.strip() == "ok"


def test_pdb_before_and_after(installed: FreshEnv):
    before = "import pdb, cmd; assert issubclass(pdb.Pdb, cmd.Cmd); print(cmd.__file__)"
    after = "import cmd, pdb; assert issubclass(pdb.Pdb, cmd.Cmd); print(cmd.__file__)"
    assert installed.run(before).stdout.strip() == _expected_init(installed)
    assert installed.run(after).stdout.strip() == _expected_init(installed)


def test_python_m_pdb_runs_script(installed: FreshEnv):
    script = installed.workdir / "debugged.py"
    script.write_text("import cmd\nx = 40 + 2\nprint('finished', x, cmd.__name__)\n")
    proc = installed.run("", "-m", "pdb", str(script), stdin="continue\nquit\n")
    assert "finished 42 cmd" in proc.stdout, proc.stdout + proc.stderr


def test_python_m_module_sees_package(installed: FreshEnv):
    (installed.workdir / "probe_mod.py").write_text("import cmd\nprint(cmd.__file__)\n")
    proc = installed.run("", "-m", "probe_mod")
    assert proc.stdout.strip() == _expected_init(installed)


def test_torch_import_order(installed: FreshEnv):
    a = installed.run("import torch, cmd; print(cmd.__file__); cmd.distributed.world_size()")
    b = installed.run("import cmd, torch; print(cmd.__file__); cmd.distributed.world_size()")
    assert a.stdout.strip() == b.stdout.strip() == _expected_init(installed)


def test_spawn_worker_sees_same_package(installed: FreshEnv):
    script = installed.workdir / "spawner.py"
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp

            def where():
                import cmd
                return cmd.__file__

            if __name__ == "__main__":
                with mp.get_context("spawn").Pool(1) as pool:
                    print(pool.apply(where))
                print(where())
            """
        )
    )
    proc = installed.run("", str(script))
    lines = proc.stdout.split()
    assert lines == [_expected_init(installed)] * 2, proc.stdout + proc.stderr


def test_opt_out_variable_gives_stdlib(installed: FreshEnv):
    proc = installed.run(
        "import cmd; print(cmd.__file__)", env=_clean_env(CMD_FGVC_DISABLE_IMPORT_HOOK="1")
    )
    assert proc.stdout.strip() == STDLIB_CMD and proc.stderr == ""


def test_pep829_start_file_points_at_installer(installed: FreshEnv):
    start = installed.site / "cmd_fgvc.start"
    assert start.read_text().strip() == "_cmd_fgvc_hook:install"
    code = "import pkgutil; f = pkgutil.resolve_name({!r}); f(); print(callable(f))".format("_cmd_fgvc_hook:install")
    assert installed.run(code).stdout.strip() == "True"


def test_uninstall_leaves_working_stdlib(tmp_path: Path, wheel: Path):
    env = FreshEnv(tmp_path)
    env.pip("install", "--no-deps", "--no-index", str(wheel))
    assert env.run("import cmd; print(cmd.__file__)").stdout.strip() == str(env.site / "cmd" / "__init__.py")
    env.pip("uninstall", "-y", "cmd-fgvc")
    proc = env.run("import cmd, pdb; print(cmd.__file__); assert issubclass(pdb.Pdb, cmd.Cmd)")
    assert proc.stdout.strip() == STDLIB_CMD and proc.stderr == ""
    assert not (env.site / "cmd_fgvc.pth").exists()


def test_broken_install_degrades_to_stdlib(tmp_path: Path, wheel: Path):
    env = FreshEnv(tmp_path)
    env.pip("install", "--no-deps", "--no-index", str(wheel))
    # Break the install: the package folder is gone but the hook is still there.
    import shutil

    shutil.rmtree(env.site / "cmd")
    proc = env.run("import cmd; print(cmd.__file__)")
    assert proc.stdout.strip() == STDLIB_CMD and proc.stderr == ""
    # A hook module that raises at start-up must not break start-up either.
    (env.site / "_cmd_fgvc_hook.py").write_text("raise RuntimeError('broken')\n")
    proc = env.run("import cmd; print(cmd.__file__)")
    assert proc.stdout.strip() == STDLIB_CMD and proc.stderr == ""


def test_console_commands_work_from_fresh_install(installed: FreshEnv):
    """``cmd-fgvc``, ``cmd-fgvc pretrain --help`` and ``python -m cmd evaluate --help`` (issue 16 section 1)."""
    script = installed.venv / "bin" / "cmd-fgvc"
    assert script.is_file(), f"no console script at {script}"
    cases = [
        ([str(script), "--help"], ["pretrain", "evaluate"]),
        ([str(script), "--version"], ["cmd-fgvc"]),
        # (--help answers without importing torch; see cmd/cli/__init__.py)
        ([str(script), "pretrain", "--help"], ["usage: cmd-fgvc pretrain", "--epochs", "(default: 10)", "--config"]),
        ([installed.python, "-m", "cmd", "evaluate", "--help"],
         ["usage: cmd-fgvc evaluate", "{knn,linear,retrieval}", "--every", "--pretrained_weights", "--config"]),
    ]
    for argv, expected in cases:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(installed.workdir), env=_clean_env(),
                              timeout=300)
        shown = " ".join(argv[-2:])
        assert proc.returncode == 0, f"{shown}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        for text in expected:
            assert text in proc.stdout, f"{shown}: {text!r} not in\n{proc.stdout}"
    # the program that ran is the installed one
    where = installed.run("import cmd.cli.options as o; print(o.__file__)").stdout.strip()
    assert where == str(Path(_expected_init(installed)).parent / "cli" / "options.py")
