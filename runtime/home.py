"""Where converted models live, and how a name on the command line finds one.

Models are folders under `moe_home()/models/<name>`: the Hub id with "/" -> "--" (or a
local source folder's name), suffixed `-q8` or `-f16` when not 4-bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MoeError
from .layout import MANIFEST

_SUFFIX = {4: "", 8: "-q8", 16: "-f16"}


def moe_home() -> Path:
    home = os.environ.get("MOE_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "moe"


def models_dir() -> Path:
    return moe_home() / "models"


def model_name(src: str, bits: int = 4) -> str:
    """`org/name` -> `org--name`, a local folder -> its name; `-q8` / `-f16` unless 4-bit."""
    path = Path(src).expanduser()
    base = path.resolve().name if path.exists() else src.strip("/").replace("/", "--")
    return base + _SUFFIX.get(bits, f"-b{bits}")


def default_output(src: str, bits: int) -> Path:
    return models_dir() / model_name(src, bits)


def resolve_model(spec: str) -> Path:
    """A converted model's folder from a path, a model name, or a Hub id already converted."""
    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        return path
    base = spec.strip("/").replace("/", "--")
    for name in (base, *(base + s for s in _SUFFIX.values() if s)):
        if (models_dir() / name / MANIFEST).is_file():
            return models_dir() / name
    if path.is_dir():
        raise MoeError(f"{path}: not a converted model (no {MANIFEST}); convert it with `moe convert {spec}`")
    raise MoeError(f"{spec}: no converted model by that name or path; convert it with `moe convert {spec}` "
                   "(`moe list` shows the converted ones)")


def list_models() -> list[dict]:
    """The converted models under moe_home(): name, path, architecture, bits and size in bytes, by name."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue  # temporary folders of conversions in progress, stray files
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            arch = manifest.get("architecture", "?")
            bits = manifest.get("quantization", {}).get("bits")
        except (OSError, ValueError, AttributeError):
            arch, bits = "unreadable manifest", None
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        out.append({"name": folder.name, "path": str(folder), "architecture": arch, "bits": bits, "size": size})
    return out
