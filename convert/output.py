"""A conversion's output: written into a temporary folder beside OUT and renamed into place only when complete
(any error, Ctrl-C or SIGTERM removes it), with a progress bar on a terminal."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from ..runtime.errors import MoeError


class Progress:
    """Bytes of source converted, per tensor: a rich bar on stderr when it is a terminal, else nothing."""

    def __init__(self, total: int):
        self.bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                transient=True)
            self.task = self.bar.add_task("converting", total=total)
            self.bar.start()

    def advance(self, nbytes: int, name: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, description=name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit (so cleanup runs) instead of killing the process outright; a handler already
    in place (the CLI's, which says "terminated") is kept."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def partial_folder(out: Path, force: bool):
    """A temporary folder beside `out` to write the model into, renamed to `out` when the block completes and
    removed whatever happens; a full disk or an unwritable folder is one line."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        with _sigterm_as_exit():
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(out)
            tmp.mkdir()
            yield tmp
            _move_into_place(tmp, out, force)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise MoeError(f"{out.parent}: no space left for the converted model ({exc.strerror}); free some space "
                           "or choose another output with -o", 1) from None
        raise MoeError(f"{exc.filename or out}: cannot write the converted model ({exc.strerror})", 1) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_partials(out: Path) -> None:
    """Temporary folders of conversions into `out` whose process is gone (killed outright, or the machine
    stopped), and this process's own from an earlier call."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) < 2**31 and (int(pid) == os.getpid() or not _running(int(pid))):
            shutil.rmtree(partial, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if force and (out.exists() or out.is_symlink()):
        os.replace(out, old) if not out.is_symlink() else out.unlink()
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise MoeError(f"{out}: appeared while converting; pass --force to replace it", 2) from None
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
