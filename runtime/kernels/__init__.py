"""Numba kernels: flat functions over arrays, knowing nothing of checkpoints.

This package is imported before numba anywhere in moe: it points NUMBA_CACHE_DIR into a
folder of the user's cache (of NUMBA_CACHE_DIR when that is set) and holds the numba flags
every kernel uses, so compiled kernels are cached on disk and only the first run compiles them.

numba checks a cached function against its own file only, not against the flags or inlined
helpers it takes from other files; so that folder is named after a hash of numba's version
and every kernel source (and the layout's constants): any change compiles afresh.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path


def _default_root() -> Path:
    home = os.environ.get("MOE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "moe"
    return base / "numba-cache"


def _sources_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256(metadata.version("numba").encode())
    for src in sorted(here.glob("*.py")) + [here.parent / "layout.py"]:  # kernels read layout's CHUNK
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


SOURCES_HASH = _sources_hash()
_chosen = os.environ.get("NUMBA_CACHE_DIR")  # the user's (or a parent moe process's) folder, else ours
_ROOT = Path(_chosen) if _chosen else _default_root()
if _ROOT.name != SOURCES_HASH:  # a child process inherits the folder already named
    os.environ["NUMBA_CACHE_DIR"] = str(_ROOT / SOURCES_HASH)

# Safe fast-math: reassociation and contraction let LLVM vectorize reductions; no
# nnan/ninf, so infinities and NaNs keep their meaning. error_model "numpy": x / 0 gives
# inf or nan instead of a ZeroDivisionError check, whose branch stops vectorization.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
FLAGS = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")  # serial kernels
PARALLEL = dict(FLAGS, parallel=True)  # kernels with a prange worth spreading over threads
# Without fast-math, for code whose results must not depend on how LLVM compiled it: fast-math lets the
# same source round differently once inlined into another caller, or compiled afresh rather than cached.
EXACT = dict(FLAGS, fastmath=False)

_announced = False


def _marker() -> Path:
    return Path(os.environ["NUMBA_CACHE_DIR"]) / f"moe-kernels-{SOURCES_HASH}.ok"


def cache_is_cold() -> bool:
    """True when the kernels for this numba and these sources have never been compiled here."""
    return not _marker().exists()


def announce_compiling() -> None:
    """Say on stderr, once per process, that kernels are being compiled."""
    global _announced
    if not _announced:
        print("compiling kernels (first run only)…", file=sys.stderr, flush=True)
        _announced = True


def mark_cache_warm() -> None:
    """Record that the kernels are compiled and cached, and drop caches of other versions.

    Silently skipped when the cache is read-only.
    """
    marker = _marker()
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        return
    if not _chosen:  # in our own folder, caches of other versions are dead weight
        for old in _ROOT.iterdir():
            if old.is_dir() and old.name != SOURCES_HASH:
                shutil.rmtree(old, ignore_errors=True)
