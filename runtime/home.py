"""Where converted models live, and how a name on the command line finds one.

Models are folders under `moe_home()/models/<name>`: the Hub id with "/" -> "--" (or a
local source folder's name), suffixed `-q8` or `-f16` when not 4-bit.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MoeError
from .layout import MANIFEST, read_manifest

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
    """The converted models under moe_home(), by name: name, path, architecture, bits and size in bytes; a folder
    whose manifest cannot be read has `error` (why) in place of architecture and bits, so one never hides the rest."""
    root = models_dir()
    try:
        folders = sorted(root.iterdir()) if root.is_dir() else []
    except OSError as exc:
        raise MoeError(f"{root}: cannot list it ({exc.strerror})", 1) from None
    out = []
    for folder in folders:
        if folder.name.startswith(".") or not (folder / MANIFEST).exists():
            continue  # temporary folders of conversions in progress, stray files
        entry = {"name": folder.name, "path": str(folder)}
        try:
            manifest = read_manifest(folder)
            quantization = manifest.get("quantization")
            entry.update(architecture=str(manifest.get("architecture", "?")),
                         bits=quantization.get("bits", "?") if isinstance(quantization, dict) else "?",
                         size=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()))
        except MoeError as exc:
            entry["error"] = exc.message
        except OSError as exc:
            entry["error"] = f"{folder}: cannot read it ({exc.strerror})"
        out.append(entry)
    return out
