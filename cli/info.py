"""`moe info MODEL`: what a converted model is and what it needs."""

from __future__ import annotations

from moe.runtime.units import format_size
from rich.table import Table

from .common import out, print_json
from .options import Json, ModelArg

EXAMPLE = """Examples:

\b
  moe info mistralai--Mixtral-8x7B-v0.1
  moe info ./olmoe-q4 --json
"""


def info(model: ModelArg, json: Json = False) -> None:
    """Architecture, layers, experts, total and active parameters, bytes read per generated token, size on disk by
    part, quantization, RAM needed."""
    from moe.runtime.info import model_info

    facts = model_info(model)
    if json:
        print_json(facts)
        return
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        table.add_row(key.replace("_", " "), _text(key, value))
    out.print(table)


def _text(key: str, value) -> str:
    """Sizes in bytes as kB/MB/GB, parameter counts in millions, nested facts on one line."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(key, v)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(_text(key, v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool) and ("bytes" in key or key.startswith("size")):
        return format_size(value)
    if isinstance(value, int) and not isinstance(value, bool) and key.endswith("params"):
        return f"{value / 1e6:.2f} M"
    return str(value)
