"""`moe perplexity MODEL FILE`: exp(mean negative log-likelihood) of a text file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import err, open_model, print_json
from .options import Json, MemoryBudget, ModelArg, Threads

EXAMPLE = """Examples:

\b
  moe perplexity mistralai--Mixtral-8x7B-v0.1 wiki.test.raw --ctx 512
  moe perplexity ./olmoe-q4 eval.txt --ctx 512 --max-tokens 20000 --json
"""


def perplexity(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False, help="A UTF-8 text file.")],
    ctx: Annotated[int, typer.Option(min=2, help="Window length in tokens; each window is scored on all but its first token.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(min=1, show_default=False, help="Use only the first N tokens of the file.")] = None,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    json: Json = False,
) -> None:
    """Perplexity over consecutive windows of --ctx tokens (no BOS added; a last partial window is dropped)."""
    from moe.runtime.perplexity import perplexity as measure

    loaded, _ = open_model(model, memory_budget, threads)
    result = measure(loaded, file, ctx=ctx, max_tokens=max_tokens)
    if json:
        print_json(result)
    else:
        print(f"{result['perplexity']:.4f}")
        err.print(f"[dim]{result['tokens']} tokens scored[/dim]")
