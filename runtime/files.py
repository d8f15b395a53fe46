"""Reading files that come from anywhere: what a path is when it is not a file, reads bounded in size, and JSON
whose every failure (too large, not UTF-8, not JSON, nested deeper than Python parses) is one line naming the file."""

from __future__ import annotations

import json
import os
import stat

from .errors import MoeError
from .units import format_size

MAX_JSON = 128 * 10**6  # bytes: manifests, configs, indexes and tokenizer.json files run to tens of MB at most

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_a_file(path) -> str | None:
    """Why `path` is not a regular file ("missing", "a FIFO (named pipe), not a file"...), None when it is one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    for test, kind in _KINDS:
        if test(mode):
            return f"is {kind}, not a file"
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_bounded(path, limit: int, remedy: str, name: str | None = None) -> bytes:
    """The bytes of `path`, which may be a pipe or a device; past `limit` bytes (/dev/zero never ends) it is refused
    unread. `name`: how messages call the file (default its path)."""
    name = name or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise MoeError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise MoeError(f"{name}: is a folder, not a file; give a file") from None
    except OSError as exc:
        raise MoeError(f"{name}: cannot read it ({exc.strerror})") from None
    if len(data) > limit:
        raise MoeError(f"{name}: larger than {format_size(limit)}; {remedy}")
    return data


def load_json(path, remedy: str, name: str | None = None, limit: int = MAX_JSON):
    """The JSON value in the regular file `path`; anything else is a MoeError `{name}: <what is wrong>; {remedy}`."""
    name = name or str(path)
    problem = not_a_file(path)
    if problem:
        raise MoeError(f"{name}: {problem}; {remedy}")
    return parse_json(read_bounded(path, limit, remedy, name), name, remedy)


def parse_json(data: bytes, name: str, remedy: str):
    """`data` parsed as JSON; a MoeError naming `name` if it is not UTF-8 JSON of a depth Python can parse."""
    try:
        return json.loads(data)
    except RecursionError:
        raise MoeError(f"{name}: JSON nested too deeply to read; {remedy}") from None
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MoeError(f"{name}: not valid JSON ({exc}); {remedy}") from None


def decode_text(data: bytes, name: str) -> str:
    """`data` as UTF-8 text; otherwise one line naming the first byte that is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoeError(f"{name}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
