"""What several commands share: the consoles, opening a model by name, printing JSON."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from moe.runtime.errors import MoeError
from moe.runtime.files import decode_text, read_bounded
from moe.runtime.units import format_size
from rich.console import Console

# stdout: the product (tables of `info`, `list`, `bench`); wide when piped, so no path is cut short
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # stderr: everything else, one line per message


MAX_TEXT = 64 * 10**6  # bytes of a prompt or a text file: many times any model's context
TOO_LONG = "give a shorter text (its start: head -c 64MB FILE > part.txt)"


def status(message: str):
    """A spinner on stderr while a long step runs, only when stderr is a terminal."""
    return err.status(message) if err.is_terminal else contextlib.nullcontext()


def model_path(spec: str | None) -> Path | str:
    """`spec` as given (a folder, a converted name or Hub id), or the bundled demo, converted on first use."""
    if spec is not None:
        return spec
    from moe.convert.demo import demo_model

    return demo_model()


def open_model(spec: str | None, memory_budget: int | None = None, threads: int | None = None,
               pin: Path | None = None, kv_cache: str = "auto"):
    """(model, seconds it took to load). `pin`: a profile whose hottest experts stay resident under a budget;
    kv_cache: how the KV cache holds keys and values (load_model)."""
    from moe.runtime.model import load_model

    start = time.perf_counter()
    with status("loading the model..."):
        model = load_model(model_path(spec), memory_budget=memory_budget, threads=threads, pin=pin or (),
                           kv_cache=kv_cache)
    say(model.memory.notes)
    return model, time.perf_counter() - start


def say(notes) -> None:
    """The lines a memory decision has to tell (the budget it chose, a --pin with no effect), on stderr."""
    for line in notes:
        err.print(line, style="dim", markup=False)


def read_text(file: Path) -> str:
    """A UTF-8 text file given on the command line (or a pipe, /dev/stdin), of at most MAX_TEXT bytes."""
    return decode_text(read_bounded(file, MAX_TEXT, TOO_LONG), str(file))


def read_stdin() -> str:
    """All of stdin as UTF-8 text, at most MAX_TEXT bytes (a prompt from /dev/zero is refused, not read forever)."""
    if sys.stdin is None or sys.stdin.closed:
        raise MoeError("PROMPT is - but there is no stdin to read")
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream stands in for stdin (an embedding host, a test)
        data = sys.stdin.read(MAX_TEXT + 1).encode("utf-8", "surrogateescape")
    else:
        data = stream.read(MAX_TEXT + 1)
    if len(data) > MAX_TEXT:
        raise MoeError(f"stdin: larger than {format_size(MAX_TEXT)}; {TOO_LONG}")
    return decode_text(data, "stdin")


def text_argument(value: str | None, name: str) -> str | None:
    """A command-line argument as text: Python keeps bytes that are not UTF-8 as surrogates, which the tokenizer
    refuses; here they are one line naming the first such byte."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            decode_text(os.fsencode(value), name)  # raises, at the byte
    return value


def print_json(obj) -> None:
    """One JSON object on stdout (numpy scalars and arrays become numbers and lists)."""
    sys.stdout.write(json.dumps(obj, indent=1, default=_plain) + "\n")
    sys.stdout.flush()


def _plain(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return str(obj)
