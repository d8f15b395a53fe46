"""What several commands share: the consoles, opening a model by name, printing JSON."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from moe.runtime.errors import MoeError
from rich.console import Console

# stdout: the product (tables of `info`, `list`, `bench`); wide when piped, so no path is cut short
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # stderr: everything else, one line per message


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
               pin: Path | None = None):
    """(model, seconds it took to load). `pin`: a profile whose hottest experts stay resident under a budget."""
    from moe.runtime.model import load_model

    path = model_path(spec)
    pairs = pinned(pin, path, memory_budget)
    start = time.perf_counter()
    with status("loading the model..."):
        model = load_model(path, memory_budget=memory_budget, threads=threads, pin=pairs)
    if pin is not None and getattr(model.experts, "budget", None) is None:
        err.print(f"note: --pin {pin} has no effect: every expert is mapped (give a --memory-budget)", style="dim")
    return model, time.perf_counter() - start


def pinned(pin: Path | None, model, memory_budget: int | None) -> list[tuple[int, int]]:
    """The (layer, expert) pairs of a profile to keep resident, hottest first; none without one."""
    if pin is None:
        return []
    from moe.runtime.routing_stats import read_pins

    return read_pins(pin, model, memory_budget)


def read_text(file: Path) -> str:
    """A UTF-8 text file given on the command line; anything else is a one-line error."""
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoeError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise MoeError(f"{file}: is a folder; give a text file") from None
    except UnicodeDecodeError as exc:
        raise MoeError(f"{file}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise MoeError(f"{file}: cannot read it ({exc.strerror})") from None


def print_json(obj) -> None:
    """One JSON object on stdout (numpy scalars and arrays become numbers and lists)."""
    sys.stdout.write(json.dumps(obj, indent=1, default=_plain) + "\n")
    sys.stdout.flush()


def _plain(obj):
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    return str(obj)
