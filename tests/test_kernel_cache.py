"""A kernel cache that cannot be written: runs still work, nothing lands in the installed sources
(numba's fallback, keyed without our sources hash), and the compile notice says why, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moe.runtime.kernels
import pytest
from moe.cli import main
from moe.convert import convert
from tiny import make_checkpoint

IN_TREE = Path(moe.runtime.kernels.__file__).parent / "__pycache__"  # where numba falls back to


def _in_tree() -> list[str]:
    return sorted(p.name for p in IN_TREE.iterdir()) if IN_TREE.is_dir() else []


def _child(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """python args, in an environment of its own: a private TMPDIR, no bytecode written, `env` on top."""
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "MOE_HOME")}
    (tmp_path / "tmp").mkdir()
    full.update(TMPDIR=str(tmp_path / "tmp"), PYTHONDONTWRITEBYTECODE="1", **env)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=900)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel-cache")
    return convert(str(make_checkpoint("mixtral", root / "src")), root / "out")


def test_moe_home_a_file_runs_and_says_why_kernels_compile_every_run(model_path, tmp_path, capsys):
    assert main(["run", str(model_path), "def", "--max-tokens", "4", "--temperature", "0"]) == 0
    want = capsys.readouterr().out
    home = tmp_path / "home"
    home.write_text("not a folder")
    before = _in_tree()
    done = _child(["-m", "moe", "run", str(model_path), "def", "--max-tokens", "4", "--temperature", "0"],
                  tmp_path, MOE_HOME=str(home))
    assert done.returncode == 0 and done.stdout == want
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"compiling kernels (every run: cannot cache them in {home}/numba-cache/")
    assert "(Not a directory); set MOE_HOME or NUMBA_CACHE_DIR to a writable folder)" in done.stderr
    assert _in_tree() == before
    assert list((tmp_path / "tmp").iterdir()) == []  # the private cache went with the process


_PROBE = """
import os, numpy as np
from moe.runtime import kernels
from moe.runtime.kernels.norms import rmsnorm
rmsnorm(np.ones((1, 1, 4), np.float32), np.ones(4, np.float32), 1e-5, np.empty((1, 1, 4), np.float32))
kernels.announce_compiling()
print(os.environ["NUMBA_CACHE_DIR"])
print(sorted(os.listdir(os.environ["NUMBA_CACHE_DIR"])))
"""


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "numba"


def _read_only(tmp_path: Path) -> Path:
    (tmp_path / "ro").mkdir(mode=0o500)
    return tmp_path / "ro" / "numba"


@pytest.mark.parametrize("where, why", [
    (_under_a_file, "Not a directory"),
    pytest.param(_read_only, "Permission denied", marks=pytest.mark.skipif(
        os.geteuid() == 0, reason="root writes into a read-only folder anyway")),
])
def test_unwritable_numba_cache_dir_compiles_into_a_private_folder(tmp_path, where, why):
    folder = where(tmp_path)
    before = _in_tree()
    done = _child(["-c", _PROBE], tmp_path, NUMBA_CACHE_DIR=str(folder))
    assert done.returncode == 0, done.stderr
    used, cached = done.stdout.splitlines()
    assert Path(used).parent.parent == tmp_path / "tmp" and cached != "[]"  # cached there, for this run
    assert done.stderr.startswith(f"compiling kernels (every run: cannot cache them in {folder}/")
    assert done.stderr.endswith(f" ({why}); set MOE_HOME or NUMBA_CACHE_DIR to a writable folder)…\n")
    assert done.stderr.count("\n") == 1
    assert _in_tree() == before
    assert list((tmp_path / "tmp").iterdir()) == []
