"""`moe verify MODEL`: every tensor's and expert's checksum, and the layout's sizes."""

from __future__ import annotations

from moe.runtime.errors import MoeError

from .common import status
from .options import ModelArg

EXAMPLE = """Examples:

\b
  moe verify mistralai--Mixtral-8x7B-v0.1
  moe verify ./olmoe-q4 && echo intact
"""


def verify(model: ModelArg) -> None:
    """Check a converted model; name the layer, expert and tensor of any mismatch (exit 1 if there is one)."""
    from moe.runtime.home import resolve_model
    from moe.runtime.layout import verify as check

    folder = resolve_model(model)
    with status(f"verifying {folder}..."):
        problems = check(folder)
    for line in problems:
        print(f"{folder}: {line}")
    if problems:
        raise MoeError(f"{folder}: {len(problems)} checksum mismatch(es); reconvert the model", 1)
    print(f"{folder}: ok")
