"""The bundled demo model: a tiny trained Mixtral converted on first use."""

from __future__ import annotations

import sys
from pathlib import Path

from ..runtime.errors import MoeError
from ..runtime.home import models_dir
from ..runtime.layout import MANIFEST

DEMO_SOURCE = Path(__file__).parent / "demo" / "tinymix"
DEMO_NAME = "demo-tinymix"


def demo_model() -> Path:
    """The converted demo model's folder, converting the bundled checkpoint at 4 bits the first time."""
    from .converter import convert

    out = models_dir() / DEMO_NAME
    if (out / MANIFEST).is_file():
        return out
    print(f"converting the bundled demo model into {out} (first use only)…", file=sys.stderr, flush=True)
    try:
        return convert(DEMO_SOURCE, out, bits=4, force=out.exists())
    except MoeError:
        if (out / MANIFEST).is_file():  # another process converted it meanwhile
            return out
        raise
