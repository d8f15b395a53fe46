"""`moe plan SRC`: before any download, what a checkpoint becomes and whether (and how fast) it runs here."""

from __future__ import annotations

from typing import Annotated

import typer
from moe.runtime.units import format_size, parse_size
from rich.table import Table

from .common import err, out, print_json, status
from .options import Json

EXAMPLE = """Examples:

\b
  moe plan allenai/OLMoE-1B-7B-0924
  moe plan mistralai/Mixtral-8x7B-v0.1 --memory 16GB --bits 4
  moe plan ./my-checkpoint --json
"""


def plan(
    src: Annotated[str, typer.Argument(
        metavar="SRC", show_default=False,
        help="A Hub id (org/name) or a local folder in the Hugging Face layout; only config.json and the "
             "safetensors headers are read.")],
    memory: Annotated[str | None, typer.Option(
        "--memory", metavar="SIZE", show_default=False,
        help="RAM moe may use, e.g. 16GB; default: what is available now. What the non-expert weights, the KV "
             "cache and the runtime leave of it is the expert budget.")] = None,
    bits: Annotated[int, typer.Option(help="Bits per expert weight in the layout: 4, 8 or 16.")] = 4,
    revision: Annotated[str | None, typer.Option(help="A branch, tag or commit of a Hub id.", show_default=False)] = None,
    remeasure: Annotated[bool, typer.Option(
        "--remeasure", help="Measure this machine again instead of using the cached figures.")] = False,
    json: Json = False,
) -> None:
    """Size, RAM, smallest budget and predicted decode speed of a model, before downloading it."""
    from moe.convert.plan import assess

    memory_bytes = None if memory is None else parse_size(memory, "--memory")
    with status("reading config.json and the safetensors headers..."):
        facts = assess(src, memory_bytes, bits, revision, remeasure, say=lambda m: err.print(m, style="dim"))
    if json:
        print_json(facts)
        return
    table = Table(title=f"moe plan: {facts['source']}", show_header=False, title_justify="left")
    for label, value in _rows(facts):
        table.add_row(label, value)
    out.print(table)
    out.print(f"[bold]{_verdict(facts)}[/bold]")


def _rows(f: dict) -> list[tuple[str, str]]:
    from moe.convert.plan import tok_s_text

    m, size = f["machine"], format_size
    rows = [
        ("architecture", f"{f['hf_architecture'] or f['architecture']}: {f['layers']} layers, {f['experts']} experts, "
                         f"top-{f['top_k']}"),
        ("parameters", f"{_count(f['total_params'])} total, {_count(f['expert_params'])} in experts, "
                       f"{_count(f['active_params'])} active per token"),
        ("download", f"{size(f['source_bytes'])} of safetensors (not needed for this plan)"),
        (f"layout at {f['bits']} bits", f"{size(f['layout_bytes'])} (non-expert {size(f['model_bin_bytes'])}, "
                                        f"experts {size(f['experts_bin_bytes'])})"),
        ("touched per token", f"{size(f['bytes_per_token'])} of weights, {size(f['expert_bytes_per_token'])} of them "
                              "experts"),
        ("RAM, all in memory", f"{size(f['ram_bytes'])} (with a KV cache of {f['context']} tokens, "
                               f"{size(f['kv_cache_bytes'])}, and the runtime)"),
        ("smallest budget", f"--memory-budget {size(f['min_budget_bytes'])}: RAM {size(f['ram_bytes_at_min_budget'])}"),
        ("this machine", f"memory {_rate(m['memory_bandwidth'])}, q4 kernel {_rate(m['matvec']['q4'])}, "
                         f"disk {_rate(m['disk_read'])}, {m['threads']} thread{'s' * (m['threads'] != 1)}"),
        ("decode, in RAM", f"about {tok_s_text(f['predicted_in_ram_tok_s'])} tok/s"),
    ]
    paged = f["predicted_at_budget"]
    if paged:
        rows.append((f"decode, budget {size(f['budget_bytes'])}",
                     f"about {tok_s_text(paged['decode_tok_s'])} tok/s: hit rate {paged['hit_rate']:.0%}, "
                     f"{size(paged['expert_bytes_read_per_token'])} read per token from the {paged['misses_from']}"))
    return rows


def _verdict(f: dict) -> str:
    from moe.convert.plan import tok_s_text

    memory = f"{format_size(f['memory_bytes'])} of RAM"
    if f["verdict"] == "fits in RAM":
        return f"fits in RAM ({format_size(f['ram_bytes'])} of {memory}): about {tok_s_text(f['predicted_decode_tok_s'])} tok/s"
    if f["predicted_decode_tok_s"] is not None:
        return (f"{f['verdict']} in {memory} (run it with --memory-budget {format_size(f['budget_bytes'])})")
    return (f"does not run in {memory}: it needs at least {format_size(f['ram_bytes_at_min_budget'])} "
            "even with the smallest expert budget")


def _rate(bytes_per_s: float) -> str:
    return f"{format_size(bytes_per_s)}/s"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
