"""`moe run [MODEL] PROMPT`: stream a continuation to stdout (the text only; everything else on stderr)."""

from __future__ import annotations

import os
import re
import sys
from typing import Annotated

import typer
from moe.runtime.bench import expert_counters
from moe.runtime.errors import MoeError
from moe.runtime.generate import DEFAULT_MAX_TOKENS, generate
from moe.runtime.machine import peak_rss
from moe.runtime.units import format_size

from .common import err, open_model, print_json, read_stdin, text_argument
from .options import (
    Json,
    KvCache,
    KvCacheKind,
    MaxTokens,
    MemoryBudget,
    MinP,
    ModelOrDemo,
    Pin,
    Seed,
    Temperature,
    Threads,
    TopK,
    TopP,
)

EXAMPLE = """Examples:

\b
  moe run "def fibonacci(n):"                      (the bundled demo model)
  moe run mistralai--Mixtral-8x7B-v0.1 "Once upon a time" --max-tokens 100 --temperature 0.8 --seed 1
  echo "def add(a, b):" | moe run - --max-tokens 20 --temperature 0
  moe run MODEL "Write a haiku about CPUs" --chat --system "You are terse." --memory-budget 2GB --stats
"""


def run(
    model: ModelOrDemo = None,
    prompt: Annotated[str | None, typer.Argument(
        metavar="PROMPT", show_default=False, help="The text to continue; - reads it from stdin.")] = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop before this text (repeatable; \\n and \\t are understood). It is not printed.", show_default=False)] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message for --chat.", show_default=False)] = None,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    kv_cache: KvCache = KvCacheKind.auto,
    pin: Pin = None,
    json: Json = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and expert-cache figures on stderr.")] = False,
) -> None:
    """Generate text from a prompt and stream it to stdout.

    With one argument, it is the prompt for the bundled demo model; one that names a folder or a converted model
    is refused (the prompt was forgotten): give both, or pipe the text in (echo TEXT | moe run -).
    """
    if prompt is None:
        if model is None:
            raise typer.BadParameter("missing; give the text to continue, or - to read it from stdin", param_hint="PROMPT")
        _check_not_a_model(model)
        model, prompt = None, model
    prompt = _read_stdin() if prompt == "-" else text_argument(prompt, "PROMPT")
    system = text_argument(system, "--system")
    stop = [text_argument(s, "--stop") for s in stop or []]
    loaded, load_s = open_model(model, memory_budget, threads, pin, kv_cache.value)
    generation = generate(
        loaded, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        stop=[_unescape(s) for s in stop], chat=chat, system=system)
    try:
        for piece in generation:
            if not json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        rest = generation.interrupt()
        if not json:
            sys.stdout.write(rest)
        _finish(generation, loaded, load_s, json, stats)
        raise
    _finish(generation, loaded, load_s, json, stats)


def _finish(generation, model, load_s: float, json: bool, stats: bool) -> None:
    figures = {**generation.summary(), "load_s": round(load_s, 4), "peak_rss_bytes": peak_rss()}
    if json:
        print_json({"text": generation.text, **figures, "model_stats": model.stats})
    elif generation.text and not generation.text.endswith("\n") and sys.stdout.isatty():
        sys.stdout.write("\n")  # keep the shell prompt off the last line; pipes get the text exactly
        sys.stdout.flush()
    if stats:
        _print_stats(figures, model.stats)


def _print_stats(figures: dict, model_stats: dict) -> None:
    hits, misses, read = expert_counters(model_stats)
    parts = [
        f"prompt {figures['prompt_tokens']} tokens at {_rate(figures['prefill_tok_s'])}",
        f"generated {figures['generated_tokens']} tokens at {_rate(figures['decode_tok_s'])}",
        f"first token after {figures['ttft_s']:.3f} s",
        f"load {figures['load_s']:.2f} s",
        f"peak RSS {format_size(figures['peak_rss_bytes'])}",
    ]
    if hits + misses:
        parts.append(f"expert cache hit rate {hits / (hits + misses):.1%}, {format_size(read)} read")
    err.print(" | ".join(parts) + f" ({figures['finish_reason']})", style="dim", markup=False)


def _rate(tok_s: float | None) -> str:
    return "-" if tok_s is None else f"{tok_s:.1f} tok/s"


def _read_stdin() -> str:
    if sys.stdin is not None and not sys.stdin.closed and sys.stdin.isatty():
        err.print("[dim]reading the prompt from stdin; end it with Ctrl-D[/dim]")
    text = read_stdin()
    if not text:
        raise MoeError("stdin held no prompt; pipe some text in")
    return text


def _check_not_a_model(text: str) -> None:
    """`moe run NAME` alone, where NAME is a folder or a converted model: the prompt is missing, not the model."""
    from moe.runtime.home import models_dir

    name = text.strip("/").replace("/", "--")  # as moe convert names a Hub id's folder
    if text and (os.path.isdir(os.path.expanduser(text)) or name and os.path.isdir(models_dir() / name)):
        raise MoeError(f"{text} is a folder or a converted model, and no prompt follows: give both "
                       f"(moe run {text} \"PROMPT\"), or to run the demo on the text {text!r}, pipe it in "
                       f"(echo {text} | moe run -)")


_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def _unescape(text: str) -> str:
    return re.sub(r"\\[nt\\]", lambda m: _ESCAPES[m.group(0)], text)
