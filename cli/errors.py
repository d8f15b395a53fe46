"""The one place failures become what users see: one line on stderr and an exit code.

0 success, 1 runtime failure, 2 bad usage or bad input, 130 Ctrl-C, 143 SIGTERM, 141 closed stdout pipe.
`--debug` (before the command) or MOE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import typer
from moe.runtime.errors import MoeError

DEBUG_HINT = "set MOE_DEBUG=1 or --debug for the traceback"
SIGPIPE = getattr(signal, "SIGPIPE", 13)  # Windows has no SIGPIPE; the exit code stays the shells' 141


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so `finally` blocks clean up as for Ctrl-C."""


def execute(app: typer.Typer, argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv) or ["--help"]
    debug = wants_debug(args)
    previous = _on_sigterm()
    try:
        command = typer.main.get_command(app)
        with command.make_context("moe", args) as ctx:
            command.invoke(ctx)
        return 0
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # usage errors and bad option values: exit 2
        _say(_usage_line(exc))
        return exc.exit_code
    except MoeError as exc:
        if debug:
            traceback.print_exc()
        _say(f"error: {exc.message}")
        return exc.exit_code
    except Terminated:
        _say("terminated")
        return 128 + signal.SIGTERM
    except (KeyboardInterrupt, typer.Abort):
        _say("interrupted")
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`moe run ... | head`); say nothing more to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + SIGPIPE
    except SystemExit:
        raise
    except BaseException as exc:  # any Exception, or a Rust panic (pyo3's PanicException is a BaseException)
        if debug:
            traceback.print_exc()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _say(f"error: unexpected {type(exc).__name__}{': ' + message if message else ''} ({DEBUG_HINT})")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def wants_debug(args: list[str]) -> bool:
    """MOE_DEBUG=1, or --debug among the options before the command name."""
    if os.environ.get("MOE_DEBUG", "") not in ("", "0"):
        return True
    for arg in args:
        if not arg.startswith("-"):
            return False
        if arg == "--debug":
            return True
    return False


def _usage_line(exc: typer.TyperException) -> str:
    line = f"error: {exc.format_message()}"
    ctx = getattr(exc, "ctx", None)
    if exc.exit_code == 2 and ctx is not None:
        line += f" (see `{ctx.command_path} --help`)"
    return line


def _say(line: str) -> None:
    try:
        sys.stderr.flush()
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr itself is gone; the exit code still tells


def _raise_terminated(signum, frame):
    raise Terminated()


def _on_sigterm():
    """Route SIGTERM through Terminated while a command runs (main thread only); return the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None  # not the main thread (an embedding host): leave signals alone
