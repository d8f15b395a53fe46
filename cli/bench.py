"""`moe bench [MODEL]`: speed, memory and expert-cache figures of one model on this machine."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from moe.runtime.bench import STREAMS
from moe.runtime.bench import bench as measure
from moe.runtime.units import format_size
from rich.table import Table

from .common import model_path, out, print_json, say, status
from .options import Json, KvCache, KvCacheKind, MemoryBudget, Pin, Threads

Stream = Enum("Stream", {name: name for name in STREAMS}, type=str)

EXAMPLE = """Examples:

\b
  moe bench                                   (the bundled demo model)
  moe bench MODEL --prompt-tokens 512 --gen-tokens 128 --threads 4 --repeat 5 --json
  moe bench MODEL --memory-budget 2GB
  moe bench MODEL --depth 1024 --prompt-tokens 64  (prefill and decode after 1024 tokens of context)
  moe bench MODEL --stream greedy                (decode fed its own output instead of random ids)
  moe bench MODEL --depth 1024 --kv-cache q8       (keys and values in 8 bits: half the bytes attention reads)
"""


def bench(
    model: Annotated[str | None, typer.Argument(
        metavar="MODEL", show_default=False,
        help="A converted model folder, name or Hub id; leave it out for the bundled demo.")] = None,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill measurement.")] = 128,
    gen_tokens: Annotated[int, typer.Option(min=1, help="Tokens decoded one at a time for the decode measurement.")] = 64,
    repeat: Annotated[int, typer.Option(min=1, help="Runs to take the median of.")] = 3,
    depth: Annotated[int, typer.Option(
        min=0, help="Tokens of context filled (untimed) before the prompt, as llama-bench's -d.")] = 0,
    stream: Annotated[Stream, typer.Option(
        help="What decode is fed: seeded random ids (as llama-bench; honest for the expert cache) or the model's "
             "own greedy output (a random-weight model then repeats one token).")] = Stream.random,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    kv_cache: KvCache = KvCacheKind.auto,
    pin: Pin = None,
    json: Json = False,
) -> None:
    """Measure load time, time to first token, prefill and decode tokens/s, peak RSS and expert-cache figures.

    Kernel compilation (first run only) and warm-up are timed apart and kept out of the other figures.
    """
    path = model_path(model)
    with status("benchmarking..."):
        figures = measure(path, prompt_tokens, gen_tokens, memory_budget, threads, repeat, pin or (), stream.value, say, depth,
                          kv_cache.value)
    figures = {"model": str(path), **figures}
    if json:
        print_json(figures)
        return
    table = Table(title=f"moe bench: {path}", show_header=False)
    for label, value in _rows(figures):
        table.add_row(label, value)
    out.print(table)


def _rows(f: dict) -> list[tuple[str, str]]:
    return [
        ("load", f"{f['load_s']:.3f} s"),
        ("kernel compilation (first run only)", f"{f['compile_s']:.3f} s"),
        ("warm-up", f"{f['warmup_s']:.3f} s"),
        ("time to first token", f"{f['ttft_s'] * 1000:.1f} ms for {f['prompt_tokens']} prompt tokens"
         + (f" after {f['depth']} of context" if f["depth"] else "")),
        ("prefill", f"{f['prefill_tok_s']:.1f} tok/s"),
        ("decode", f"{f['decode_tok_s']:.2f} tok/s over {f['gen_tokens']} tokens ({f['stream']} stream)"),
        ("read per generated token", f"{format_size(f['bytes_per_token'])}, {f['decode_gb_s']:.1f} GB/s while decoding"),
        ("KV cache", f["kv_cache"]),
        ("peak RSS", format_size(f["peak_rss_bytes"])),
        ("expert cache hit rate", f"{f['expert_cache_hit_rate']:.1%}"),
        ("expert bytes read per token", format_size(f["expert_bytes_read_per_token"])),
        ("disk bytes read per token", "-" if f["disk_bytes_read_per_token"] is None
         else format_size(f["disk_bytes_read_per_token"])),
        ("threads, repeats", f"{f['threads']}, median of {f['repeat']}"),
    ]
