"""Sizes people type (`2GB`, `512MiB`, `1.5G`) into bytes, and bytes back into short text."""

from __future__ import annotations

import re

from .errors import MoeError

# As GNU coreutils reads them: kB/MB/GB/TB are powers of 1000; K/M/G/T and KiB/MiB/GiB/TiB powers of 1024.
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
_UNITS = {
    "": 1, "b": 1,
    **{p + "b": 1000**n for p, n in _POWERS.items()},
    **{p + suffix: 1024**n for p, n in _POWERS.items() for suffix in ("", "i", "ib")},
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(value: str | int, what: str = "") -> int:
    """Bytes in `value`: an int, or a number with an optional unit (2GB, 512MiB, 1.5G; case does not matter)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise MoeError(f"{_named(what)}{value} is negative; give a size such as 2GB or 512MiB")
        return value
    m = _SIZE.fullmatch(str(value))
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS:
        raise MoeError(f"{_named(what)}{value!r} is not a size; write it like 2GB, 512MiB or 1.5G")
    return int(float(m.group(1)) * _UNITS[unit])


def _named(what: str) -> str:
    return f"{what} " if what else ""


def format_size(n: int | float) -> str:
    """`1.50 GB`-style text (decimal units, as disks and `ls -h --si` count)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_sizes(a: int, b: int) -> tuple[str, str]:
    """Two sizes a message compares, as format_size, or in exact bytes where those would read the same
    ("131.07 kB is below the minimum of 131.07 kB")."""
    short = format_size(a), format_size(b)
    return short if short[0] != short[1] or a == b else (f"{a:,} bytes", f"{b:,} bytes")
