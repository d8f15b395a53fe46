"""The wheel trap, caught early: every package folder is listed in pyproject, and `python -m moe` works."""

import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there, tomllib's origin
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {ROOT / folder: package for package, folder in setup["package-dir"].items()}
    assert set(folders.values()) <= set(setup["packages"])
    found = set()
    for folder in folders:
        for init in folder.rglob("__init__.py"):
            owner = max((f for f in folders if f in init.parents), key=lambda f: len(f.parts))
            found.add(".".join([folders[owner], *init.parent.relative_to(owner).parts]))
    assert found == set(setup["packages"]), "add new subpackages to pyproject's package-dir and packages"


def test_python_dash_m_moe():
    done = subprocess.run([sys.executable, "-m", "moe", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("moe ") and done.stderr == ""
