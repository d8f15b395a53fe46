"""Numba kernels: flat functions over arrays, knowing nothing of checkpoints.

This package is imported before numba anywhere in moe: it points NUMBA_CACHE_DIR into a
folder of the user's cache (of NUMBA_CACHE_DIR when that is set) and holds the numba flags
every kernel uses, so compiled kernels are cached on disk and only the first run compiles them.

numba checks a cached function against its own file only, not against the flags or inlined
helpers it takes from other files; so that folder is named after a hash of numba's version
and every kernel source (and the layout's constants): any change compiles afresh.

When that folder cannot be created or written (MOE_HOME a file, a read-only NUMBA_CACHE_DIR),
numba would cache into the installed sources (kernels/__pycache__), keyed without that hash;
the kernels are cached instead in a private temporary folder removed at exit, so they compile
on every run, and the notice while compiling says so and why.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path


def _default_root() -> Path:
    home = os.environ.get("MOE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".cache" / "moe"
    return base / "numba-cache"


def _sources_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256(metadata.version("numba").encode())
    for src in sorted(here.glob("*.py")) + [here.parent / "layout.py", here.parent / "codec.py"]:  # constants, q5_bit
        h.update(src.name.encode())
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def _unwritable(folder: Path) -> str | None:
    """Why numba could not cache in folder (its own test: create it, write a file there), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


SOURCES_HASH = _sources_hash()
_chosen = os.environ.get("NUMBA_CACHE_DIR")  # the user's (or a parent moe process's) folder, else ours
_ROOT = Path(_chosen) if _chosen else _default_root()
CACHE_DIR = _ROOT if _ROOT.name == SOURCES_HASH else _ROOT / SOURCES_HASH  # a child inherits the folder named
UNCACHED = _unwritable(CACHE_DIR)  # the folder kernels cannot be cached in and why, or None
if UNCACHED:
    _private = tempfile.mkdtemp(prefix="moe-kernels-")
    atexit.register(shutil.rmtree, _private, True)
    UNCACHED = f"{CACHE_DIR} ({UNCACHED})"
    CACHE_DIR = Path(_private) / SOURCES_HASH
os.environ["NUMBA_CACHE_DIR"] = str(CACHE_DIR)

# Fast-math that cannot change a result with how LLVM compiles it: contraction (fused multiply-adds) and no signed
# zeros. Not reassociation, nor reciprocals: with them LLVM chose the order of a sum, and chose differently for
# one source compiled afresh (numba's parallel loops run a copy compiled on its own) than in the copy numba cached,
# so a prompt's logits depended on whether the process had compiled its kernels. Sums that must be fast are
# written in vector lanes (simd.dot1, dot4, lane_sum, the quantized kernels). No nnan/ninf, so infinities and
# NaNs keep their meaning. error_model "numpy": x / 0 gives inf or nan instead of a ZeroDivisionError check,
# whose branch stops vectorization.
FASTMATH = {"nsz", "contract"}
FLAGS = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")  # serial kernels
PARALLEL = dict(FLAGS, parallel=True)  # kernels with a prange worth spreading over threads
# Without fast-math: code that must round exactly as written, contractions included (the activations' quantizer).
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
        when = (f"every run: cannot cache them in {UNCACHED}; set MOE_HOME or NUMBA_CACHE_DIR to a writable folder"
                if UNCACHED else "first run only")
        print(f"compiling kernels ({when})…", file=sys.stderr, flush=True)
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
    if not _chosen and not UNCACHED:  # in our own folder, caches of other versions are dead weight
        for old in _ROOT.iterdir():
            if old.is_dir() and old.name != SOURCES_HASH:
                shutil.rmtree(old, ignore_errors=True)
