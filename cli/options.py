"""Options several commands share, as Annotated types (one definition, one help text each)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from moe.runtime.errors import MoeError
from moe.runtime.layout import KV_CACHE_KINDS
from moe.runtime.units import parse_size


def _budget(value: str) -> int:
    try:
        return parse_size(value)
    except MoeError as exc:
        raise typer.BadParameter(exc.message) from None


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A converted model: its folder, or a name or Hub id already converted (see `moe list`).")]
ModelOrDemo = Annotated[str | None, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A converted model folder, name or Hub id (see `moe list`); leave it out for the bundled demo.")]
MemoryBudget = Annotated[int | None, typer.Option(
    "--memory-budget", metavar="SIZE", parser=_budget, show_default=False,
    help="Most RAM the expert cache may hold, e.g. 2GB, 512MiB, 1.5G; default: no limit (experts mapped).")]
Threads = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1, show_default=False, help="Worker threads for the kernels; default: all cores (the performance cores on Apple silicon).")]
KvCacheKind = Enum("KvCacheKind", {name: name for name in ("auto", *KV_CACHE_KINDS)}, type=str)
KvCache = Annotated[KvCacheKind, typer.Option(
    "--kv-cache", help="How the KV cache holds keys and values: auto (bf16 for a 4-bit model, f32 for a 16-bit one, "
                       "which keeps its logits transformers'), f32, bf16, or q8 (int8 and a scale per row: half of "
                       "bf16's memory and attention reads at long context, not exact).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of text.")]
# sampling, as `run` and `chat` take it (`serve` takes the same fields in each request)
MaxTokens = Annotated[int, typer.Option(min=0, help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 is greedy (deterministic); higher is more varied.")]
TopK = Annotated[int, typer.Option(min=0, help="Sample only among the k likeliest tokens; 0 is off.")]
TopP = Annotated[float, typer.Option(help="Sample from the smallest set of tokens holding this much probability; 1 is off.")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than min-p times the likeliest; 0 is off.")]
Seed = Annotated[int | None, typer.Option(min=0, help="Random seed: the same seed gives the same text.", show_default=False)]
Pin = Annotated[Path | None, typer.Option(
    "--pin", metavar="PROFILE", show_default=False,
    help="Keep the hottest experts of this profile (`moe profile MODEL FILE -o PROFILE`) resident in the expert "
         "cache; it matters only under a memory budget.")]
