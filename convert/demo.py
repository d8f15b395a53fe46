"""The bundled demo model: a tiny trained Mixtral converted on first use."""

from __future__ import annotations

import sys
from pathlib import Path

from ..runtime.errors import MoeError
from ..runtime.files import load_json
from ..runtime.home import models_dir
from ..runtime.layout import FORMAT_VERSION, MANIFEST

DEMO_SOURCE = Path(__file__).parent / "demo" / "tinymix"
DEMO_NAME = "demo-tinymix"


def demo_model() -> Path:
    """The converted demo model's folder, converting the bundled checkpoint at 4 bits the first time."""
    from .converter import convert

    out = models_dir() / DEMO_NAME
    if _current(out / MANIFEST):
        return out
    again = " (its layout is from an older moe)" if (out / MANIFEST).is_file() else " (first use only)"
    print(f"converting the bundled demo model into {out}{again}…", file=sys.stderr, flush=True)
    try:
        return convert(DEMO_SOURCE, out, bits=4, force=out.exists())
    except MoeError:
        if _current(out / MANIFEST):  # another process converted it meanwhile
            return out
        raise


def _current(manifest: Path) -> bool:
    """Whether a converted demo exists in this moe's layout format (an older one is converted again)."""
    try:
        return load_json(manifest, "").get("format_version") == FORMAT_VERSION
    except (MoeError, AttributeError):
        return False
