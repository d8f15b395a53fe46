"""The one place failures become what users see: one line on stderr and an exit code.

0 success, 1 runtime failure, 2 bad usage or bad input, 130 Ctrl-C, 143 SIGTERM, 141 closed stdout pipe.
`--debug` (before the command) or MOE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback

import typer
from moe.runtime.errors import MoeError

WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
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
        try:
            with command.make_context("moe", args) as ctx:
                command.invoke(ctx)
            code = 0
        except typer.Exit as exc:
            code = exc.exit_code
        sys.stdout.flush()  # output still buffered fails here, where it is reported, rather than at exit
        return code
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
        _discard_stdout()
        return 128 + SIGPIPE
    except SystemExit:
        raise
    except BaseException as exc:  # any Exception, or a Rust panic (pyo3's PanicException is a BaseException)
        if debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in WRITE_FAILURES and exc.filename is None:
            # a write to no file by name: stdout on a full device (`moe run ... > /dev/full`) or a failing disk
            _discard_stdout()
            _say(f"error: cannot write the output ({exc.strerror}); free space on its device, or send stdout elsewhere")
            return 1
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


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so what is still buffered for it does not fail again at exit."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is no real file (a test's capture): nothing flushes it at exit


def _raise_terminated(signum, frame):
    raise Terminated()


def _on_sigterm():
    """Route SIGTERM through Terminated while a command runs (main thread only); return the old handler."""
    try:
        return signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:
        return None  # not the main thread (an embedding host): leave signals alone
