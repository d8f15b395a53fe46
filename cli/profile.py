"""`moe profile MODEL FILE`: expert usage over a workload; `-o` writes the profile `--pin` reads."""

from __future__ import annotations

import json as json_module
from pathlib import Path
from typing import Annotated

import typer
from moe.runtime.errors import MoeError
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from .common import err, open_model, out, print_json, read_text
from .options import Json, ModelArg, Threads
from .trace import colour

EXAMPLE = """Examples:

\b
  moe profile MODEL workload.txt -o profile.json
  moe run MODEL "def main():" --memory-budget 1GB --pin profile.json
  moe profile MODEL workload.txt --window 64 --json
"""
BARS = " ▁▂▃▄▅▆▇█"


def profile(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(metavar="FILE", show_default=False, help="A UTF-8 text file: the workload.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PROFILE", show_default=False,
        help="Write the profile here (JSON), for `--pin` on run, bench and perplexity.")] = None,
    ctx: Annotated[int, typer.Option(min=2, help="Tokens run per sequence, as perplexity cuts the file.")] = 512,
    window: Annotated[int, typer.Option(min=1, help="Count the distinct experts per window of this many tokens.")] = 32,
    max_tokens: Annotated[int | None, typer.Option(min=2, show_default=False,
                                                   help="Use only the first N tokens of the file.")] = None,
    threads: Threads = None,
    json: Json = False,
) -> None:
    """Per MoE layer: share of tokens per expert, routing entropy, reuse between consecutive tokens, distinct
    experts per window."""
    from moe.runtime.routing_stats import profile as measure

    text = read_text(file)
    loaded, _ = open_model(model, threads=threads)
    ids = loaded.tokenizer.encode(text, add_bos=False)[:max_tokens]
    with Progress(console=err, disable=not err.is_terminal, transient=True) as bar:
        task = bar.add_task("routing the workload", total=None)
        result = measure(loaded, ids, ctx, window, progress=lambda done, total: bar.update(task, completed=done, total=total))
    result["workload"] = str(file)
    if output is not None:
        try:
            output.write_text(json_module.dumps(result, indent=1) + "\n")
        except OSError as exc:
            raise MoeError(f"-o {output}: cannot write it ({exc.strerror})") from None
        err.print(f"profile of {result['tokens']} tokens written to {output}", style="dim")
    if json:
        print_json(result)
    else:
        out.print(table(result))


def table(p: dict) -> Table:
    """One row per MoE layer: entropy, reuse, distinct experts per window, a bar per expert and the hottest."""
    E, k = p["experts"], p["top_k"]
    t = Table(title=f"expert usage over {p['tokens']} tokens (top-{k} of {E})", title_justify="left")
    for name in ("layer", "entropy", "reuse", "overlap", f"distinct/{p['window']}", "share per expert", "hottest"):
        t.add_column(name, no_wrap=True, justify="left" if name.startswith(("share", "hottest")) else "right")
    for layer in p["layers"]:
        share = layer["share"]
        top = max(share) or 1.0
        bars = Text("".join(BARS[round(s / top * (len(BARS) - 1))] for s in share))
        hot = sorted(range(E), key=lambda e: -share[e])[:3]
        hottest = Text()
        for e in hot:
            hottest.append(f"{e}", style=f"bold {colour(e)}")
            hottest.append(f" {share[e]:.0%}  ", style="dim")
        t.add_row(str(layer["layer"]), f"{layer['entropy_bits']:.2f}/{layer['max_entropy_bits']:.2f} bits",
                  _percent(layer["reuse_any"]), _percent(layer["reuse_overlap"]),
                  "-" if layer["distinct_per_window"] is None else f"{layer['distinct_per_window']:.1f}", bars, hottest)
    return t


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"
