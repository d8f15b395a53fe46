"""One small file per architecture: its config keys and tensor names mapped onto the layout.

Each module of this package (but `common`) is one architecture, found by its presence here: NAME,
HF_ARCHITECTURES, MODEL_TYPES, `model_config(hf) -> ModelConfig` and `plan(config, tensor_names) -> common.Plan`.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ...runtime.errors import MoeError

MODULES = tuple(importlib.import_module(f"{__name__}.{name}")
                for name in sorted(m.name for m in pkgutil.iter_modules(__path__)) if name != "common")
KNOWN = tuple(a for m in MODULES for a in m.HF_ARCHITECTURES)
_BY_KEY = {key: m for m in MODULES for key in (*m.HF_ARCHITECTURES, *m.MODEL_TYPES, m.NAME)}


def get(key: str | list[str] | tuple[str, ...] | None) -> ModuleType:
    """The module for a model_type, an HF architecture name, our own name, or a config's `architectures` list."""
    keys = [key] if isinstance(key, str) else list(key or [])
    for k in keys:
        if k in _BY_KEY:
            return _BY_KEY[k]
    what = ", ".join(map(str, keys)) or "none given"
    raise MoeError(f"unsupported architecture ({what}); moe converts {', '.join(KNOWN)}")


def for_config(hf: dict) -> ModuleType:
    """The module for a config.json: its `architectures`, else its `model_type`."""
    archs = hf.get("architectures") if isinstance(hf.get("architectures"), list) else []
    model_type = hf.get("model_type") if isinstance(hf.get("model_type"), str) else None
    try:
        return get([a for a in archs if isinstance(a, str)] + ([model_type] if model_type else []))
    except MoeError:
        what = ", ".join(map(str, archs)) or model_type or "no `architectures` or `model_type`"
        raise MoeError(f"config.json: unsupported architecture ({what}); moe converts {', '.join(KNOWN)}") from None
