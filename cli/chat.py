"""`moe chat [MODEL]`: a conversation in the terminal, in the model's chat template, remembered turn to turn."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Annotated

import typer
from moe.runtime.errors import MoeError
from moe.runtime.generate import DEFAULT_MAX_TOKENS, Generation, chat_ids, generate_ids

from .common import err, open_model, text_argument
from .options import (
    KvCache,
    KvCacheKind,
    MaxTokens,
    MemoryBudget,
    MinP,
    ModelOrDemo,
    Seed,
    Temperature,
    Threads,
    TopK,
    TopP,
)

EXAMPLE = """Examples:

\b
  moe chat MODEL
  moe chat MODEL --system "You are terse." --temperature 0.7 --seed 1 --stats
"""
COMMANDS = "/reset forgets the conversation, /exit or Ctrl-D leaves; Ctrl-C stops an answer"


def chat(
    model: ModelOrDemo = None,
    system: Annotated[str | None, typer.Option(help="System message that opens the conversation.", show_default=False)] = None,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    seed: Seed = None,
    memory_budget: MemoryBudget = None,
    threads: Threads = None,
    kv_cache: KvCache = KvCacheKind.auto,
    stats: Annotated[bool, typer.Option("--stats", help="After each answer, print its token counts and speed on stderr.")] = False,
) -> None:
    """Talk with a model in the terminal; each turn runs only the tokens the conversation has not run yet."""
    system = text_argument(system, "--system")
    loaded, _ = open_model(model, memory_budget, threads, kv_cache=kv_cache.value)
    name = loaded.layout.folder.name
    if not loaded.tokenizer.chat_template:
        raise MoeError(f"{name} has no chat template, so it cannot chat; `moe run` continues text instead")
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    opening = [] if system is None else [{"role": "system", "content": system}]
    messages = list(opening)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    err.print(f"chatting with {name}: {COMMANDS}", style="dim", markup=False)
    while True:
        line = _ask()
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(opening)
            err.print("(conversation forgotten)", style="dim")
            continue
        if not line.strip():
            continue
        asked = [*messages, {"role": "user", "content": line}]
        with _CtrlC() as ctrl_c:
            try:
                generation = generate_ids(loaded, chat_ids(loaded.tokenizer, asked), **sampling)
            except MoeError as exc:
                if exc.exit_code != 2:
                    raise
                err.print(f"error: {exc.message}; /reset starts the conversation over", markup=False)
                continue
            messages = [*asked, {"role": "assistant", "content": _answer(generation, ctrl_c)}]
        if stats:
            figures = generation.summary()
            rate = "-" if figures["decode_tok_s"] is None else f"{figures['decode_tok_s']:.1f} tok/s"
            err.print(f"prompt {figures['prompt_tokens']} tokens ({figures['cached_tokens']} from the cache) | "
                      f"{figures['generated_tokens']} tokens at {rate} | first token after {figures['ttft_s']:.3f} s "
                      f"({figures['finish_reason']})", style="dim", markup=False)


def _ask() -> str | None:
    """The user's next line of UTF-8 text (another is asked for otherwise); None at end of input or Ctrl-C
    (which end the session)."""
    while True:
        try:
            return text_argument(input(">>> " if sys.stdin.isatty() else ""), "that line")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return None
        except UnicodeDecodeError as exc:  # a terminal decodes strictly, a C locale keeps the bytes as surrogates
            err.print(f"error: that line: not UTF-8 text (byte {exc.start}); convert it to UTF-8", markup=False)
        except MoeError as exc:
            err.print(f"error: {exc.message}", markup=False)


def _answer(generation: Generation, ctrl_c: _CtrlC) -> str:
    """Stream the answer to stdout; Ctrl-C stops it after the current token, and what was said stays said."""
    for piece in generation:
        sys.stdout.write(piece)
        sys.stdout.flush()
        if ctrl_c.pressed:
            sys.stdout.write(generation.interrupt())
            break
    if not generation.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return generation.text


class _CtrlC:
    """While a turn runs, the first Ctrl-C only asks its answer to stop (between tokens, so the model is never
    left half-way through a forward pass); a second one interrupts for real."""

    def __enter__(self) -> _CtrlC:
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._press)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _press(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
