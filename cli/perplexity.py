"""`moe perplexity MODEL FILE`: exp(mean negative log-likelihood) of a text file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from .common import err, open_model, print_json, read_text
from .options import Json, KvCache, KvCacheKind, MemoryBudget, ModelArg, Pin, Threads

EXAMPLE = """Examples:

\b
  moe perplexity mistralai--Mixtral-8x7B-v0.1 wiki.test.raw --ctx 512
  moe perplexity ./olmoe-q4 eval.txt --ctx 512 --max-tokens 20000 --json
"""


def perplexity(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False, help="A UTF-8 text file.")],
    ctx: Annotated[int, typer.Option(min=2, help="Window length in tokens; each window is scored on all but its first token.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(min=2, show_default=False, help="Use only the first N tokens of the file.")] = None,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    kv_cache: KvCache = KvCacheKind.auto,
    pin: Pin = None,
    json: Json = False,
) -> None:
    """Perplexity over consecutive windows of --ctx tokens (no BOS added; a last partial window is dropped)."""
    from moe.runtime.perplexity import perplexity as measure

    text = read_text(file)
    loaded, _ = open_model(model, memory_budget, threads, pin, kv_cache.value)
    ids = loaded.tokenizer.encode(text, add_bos=False)[:max_tokens]
    with Progress(console=err, disable=not err.is_terminal, transient=True) as bar:
        task = bar.add_task("scoring windows", total=None)
        ppl, scored = measure(loaded, ids, ctx, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if json:
        print_json({"perplexity": ppl, "tokens": scored})
    else:
        print(f"{ppl:.4f}")
        err.print(f"{scored} tokens scored in windows of {ctx}", style="dim")
