"""Run by the wheel's venv: every module of the source tree imports, and from the venv, not the checkout.

The expected modules come from the source folders through pyproject's package-dir, so a subpackage
left out of `packages` (present in an editable install, absent from the wheel) fails here.
"""

import importlib
import importlib.resources
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra installs tomli there, tomllib's origin
    import tomli as tomllib

source = Path(sys.argv[1])
package_dir = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
folders = {source / folder: package for package, folder in package_dir.items()}

expected = set()
for folder, package in folders.items():
    for path in folder.rglob("*.py"):
        owner = max((f for f in folders if f in path.parents), key=lambda f: len(f.parts))
        if owner != folder or "__pycache__" in path.parts:
            continue
        parts = [package, *path.relative_to(folder).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            expected.add(".".join(parts))

prefix = Path(sys.prefix).resolve()
problems = []
for name in sorted(expected):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # report every failure, not just the first
        problems.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    if prefix not in Path(module.__file__).resolve().parents:
        problems.append(f"{name}: imported from {module.__file__}, not from the wheel")
demo = importlib.resources.files("moe.convert") / "demo" / "tinymix"
for fname in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
    if not (demo / fname).is_file():
        problems.append(f"moe.convert/demo/tinymix/{fname}: missing from the wheel")

print(f"{len(expected)} modules checked from the wheel", file=sys.stderr)
if problems:
    sys.exit("wheel incomplete:\n  " + "\n  ".join(problems))
