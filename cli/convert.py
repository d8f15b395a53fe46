"""`moe convert SRC`: a Hugging Face checkpoint (Hub id or local folder) into the 4-bit memory-mapped layout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

EXAMPLE = """Examples:

\b
  moe convert mistralai/Mixtral-8x7B-v0.1                 (into ~/.cache/moe/models/, or $MOE_HOME)
  moe convert ./my-olmoe-checkpoint -o ./olmoe-q8 --bits 8
  moe convert Qwen/Qwen3-30B-A3B --bits 16 --revision main --force
"""


def convert(
    src: Annotated[str, typer.Argument(
        metavar="SRC", show_default=False, help="A Hub id (org/name) or a local folder in the Hub layout.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", show_default=False, help="Output folder; default: under ~/.cache/moe/models (or $MOE_HOME).")] = None,
    bits: Annotated[int, typer.Option(help="Expert precision: 4 or 8 (group-wise quantized) or 16 (exact).")] = 4,
    group_size: Annotated[int, typer.Option(help="Columns sharing one scale (a multiple of 32).")] = 32,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
) -> None:
    """Convert a checkpoint; prints the output folder on stdout (progress and summary on stderr)."""
    from moe.convert import convert as run_convert
    from moe.convert import summary

    out = run_convert(src, output, bits=bits, group_size=group_size, revision=revision, force=force)
    print(out, flush=True)
    print(summary(out), file=sys.stderr)
