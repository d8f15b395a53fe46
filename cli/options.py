"""Options several commands share, as Annotated types (one definition, one help text each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from moe.runtime.errors import MoeError
from moe.runtime.units import parse_size


def _budget(value: str) -> int:
    try:
        return parse_size(value)
    except MoeError as exc:
        raise typer.BadParameter(exc.message) from None


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A converted model: its folder, or a name or Hub id already converted (see `moe list`).")]
MemoryBudget = Annotated[int | None, typer.Option(
    "--memory-budget", metavar="SIZE", parser=_budget, show_default=False,
    help="Most RAM the expert cache may hold, e.g. 2GB, 512MiB, 1.5G; default: no limit (experts mapped).")]
Threads = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1, show_default=False, help="Worker threads for the kernels; default: all cores (the performance cores on Apple silicon).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
Pin = Annotated[Path | None, typer.Option(
    "--pin", metavar="PROFILE", show_default=False,
    help="Keep the hottest experts of this profile (`moe profile MODEL FILE -o PROFILE`) resident in the expert "
         "cache; it matters only under a memory budget.")]
