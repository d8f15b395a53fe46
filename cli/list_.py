"""`moe list`: the converted models on this machine."""

from __future__ import annotations

from rich.table import Table

from .common import err, out, print_json
from .options import Json

EXAMPLE = """Examples:

\b
  moe list
  moe list --json
"""


def list_models(json: Json = False) -> None:
    """List the converted models under ~/.cache/moe/models (or $MOE_HOME), with their sizes."""
    from moe.runtime.home import list_models as found
    from moe.runtime.units import format_size

    models = found()
    if json:
        print_json(models)
        return
    if not models:
        err.print("no converted models yet; convert one with `moe convert SRC`")
        return
    table = Table("name", "architecture", "bits", "size", "path", box=None)
    for m in models:
        if "error" in m:
            table.add_row(m["name"], "unreadable", "?", "?", m["path"])
        else:
            table.add_row(m["name"], m["architecture"], str(m["bits"]), format_size(m["size"]), m["path"])
    out.print(table)
    for m in models:
        if "error" in m:
            err.print(f"warning: {m['name']} is unreadable: {m['error']}", markup=False)
