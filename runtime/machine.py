"""What moe needs to know about the machine it runs on, in one place, on Linux, macOS and Windows.

Memory comes from psutil (available memory as the OS reckons it: MemAvailable on Linux, free plus
reclaimable pages on macOS, the available physical memory on Windows), capped by the cgroup limit a
Linux container runs under, which psutil does not see. Kernel threads default to the performance
cores on Apple silicon, whose efficiency cores would finish an equal share of every matrix last.
Reads: positioned reads where the OS has them (a seek and a read under a lock elsewhere), and an
uncached open for measuring the disk (O_DIRECT on Linux, F_NOCACHE on macOS).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from pathlib import Path

import psutil

from .errors import MoeError

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as the largest page-aligned int64 (9223372036854771712)
# (limit, usage, reclaimable page-cache counters in memory.stat) for cgroup v2 and v1
_CGROUP_FILES = {2: ("memory.max", "memory.current", ("active_file", "inactive_file")),
                 1: ("memory.limit_in_bytes", "memory.usage_in_bytes", ("total_active_file", "total_inactive_file"))}
F_NOCACHE = 48  # macOS fcntl: reads and writes of this descriptor bypass the page cache (<sys/fcntl.h>)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows opens in text mode without it


# ---- memory


def available_ram() -> int:
    """Bytes this process could be given now: the OS's available memory, or less under a cgroup limit."""
    available = psutil.virtual_memory().available
    limit = cgroup_memory()
    return available if limit is None else min(available, limit[1])


def cgroup_memory(root: Path = CGROUP_ROOT, membership: Path = SELF_CGROUP) -> tuple[int, int] | None:
    """(limit, bytes still available under it) of the tightest memory limit on this process's cgroups (v2 and
    v1, the process's own and every ancestor's), or None where none is set or there are no cgroups.

    Usage counts the page cache, which the kernel reclaims before the limit bites (as MemAvailable counts
    it available): the file pages in memory.stat are added back.
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None  # not Linux, or no cgroups
    tightest = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            version, hierarchy = 2, root
        elif "memory" in controllers.split(","):
            version, hierarchy = 1, root / "memory"
        else:
            continue
        own = hierarchy / path.lstrip("/")
        # a container without a cgroup namespace sees its own cgroup mounted at the root: missing folders are skipped
        for folder in [own, *own.parents][: len(own.parents) - len(hierarchy.parents) + 1]:
            found = _cgroup_limit(folder, *_CGROUP_FILES[version])
            if found is not None and (tightest is None or found[1] < tightest[1]):
                tightest = found
    return tightest


def _cgroup_limit(folder: Path, limit_file: str, usage_file: str, reclaimable: tuple[str, ...]) -> tuple[int, int] | None:
    try:
        text = (folder / limit_file).read_text().strip()
        if text == "max" or int(text) >= UNLIMITED:
            return None
        limit, usage = int(text), int((folder / usage_file).read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    cache = sum(int(stat.get(key, 0)) for key in reclaimable)
    return limit, max(0, limit - max(0, usage - cache))


def peak_rss() -> int:
    """This process's peak resident set in bytes (ru_maxrss is KiB on Linux, bytes on macOS; Windows has
    no resource module, psutil reads its peak working set)."""
    try:
        import resource
    except ImportError:
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def storage_bytes_read() -> int | None:
    """Bytes this process has had fetched from storage so far, page-cache misses of its memory maps included
    (Linux /proc/self/io read_bytes, through psutil); None where the OS does not count them (macOS)."""
    try:
        return psutil.Process().io_counters().read_bytes
    except (AttributeError, psutil.Error, OSError):
        return None


# ---- CPU


def performance_cores() -> int | None:
    """The performance cores of an Apple silicon Mac (sysctl hw.perflevel0.physicalcpu); None on machines
    without performance levels."""
    if sys.platform != "darwin":
        return None
    return _sysctl_int("hw.perflevel0.physicalcpu")


def _sysctl_int(name: str) -> int | None:
    import ctypes

    value, size = ctypes.c_int(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_int))
    if ctypes.CDLL(None).sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return value.value


def default_threads() -> int:
    """Kernel threads when none are asked for: the performance cores on Apple silicon, else every core numba
    sees (NUMBA_NUM_THREADS)."""
    limit = _numba().config.NUMBA_NUM_THREADS
    fast = performance_cores()
    return limit if fast is None else max(1, min(fast, limit))


def use_threads(threads: int | None = None) -> int:
    """Set numba's thread count for this thread's kernels: `threads`, or default_threads(); returns it."""
    numba = _numba()
    limit = numba.config.NUMBA_NUM_THREADS
    if threads is None:
        threads = default_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= limit:
        raise MoeError(f"threads {threads!r}: give a whole number from 1 to {limit} (the cores numba sees)")
    numba.set_num_threads(threads)
    return threads


def _numba():
    # moe.runtime.kernels points numba's cache into moe's folder, which must happen before numba is imported
    from . import kernels  # noqa: F401, I001
    import numba

    return numba


# ---- reading files


def anonymous(n: int) -> mmap.mmap:
    """n bytes of private anonymous memory, page-aligned, zero until written: the process's own pages, which the
    OS reclaims only by swapping (never by dropping them, as it drops a mapped file's)."""
    if hasattr(mmap, "MAP_ANONYMOUS"):
        return mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, max(n, 1))  # Windows: backed by the paging file, private to this process


def open_read(path) -> int:
    """A descriptor for reading `path` (binary on Windows too)."""
    return os.open(path, os.O_RDONLY | _O_BINARY)


def uncache(fd: int) -> bool:
    """Keep this descriptor's reads and writes out of the page cache where the OS does that per descriptor
    (macOS: F_NOCACHE; pages already cached are still read from the cache); False elsewhere."""
    if sys.platform != "darwin":
        return False
    import fcntl

    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
    return True


def open_uncached(path) -> int | None:
    """A descriptor whose reads come from the device, not the page cache: O_DIRECT on Linux (its reads need
    page-aligned buffers), F_NOCACHE on macOS; None where neither is available (the file system refuses
    O_DIRECT, or Windows)."""
    if hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            return None
    fd = open_read(path)
    if uncache(fd):
        return fd
    os.close(fd)
    return None


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask the OS to forget the cached pages of the file (or of `length` bytes from `offset`), where it offers
    that (posix_fadvise)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def read_around_cache(fd: int) -> bool:
    """Reads of this descriptor should leave the page cache to others: F_NOCACHE on macOS (True: nothing more to
    do); elsewhere no read-ahead past what is asked, and False: the caller drops what it read (drop_cached)."""
    if uncache(fd):
        return True
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return False


_SEEK_LOCK = threading.Lock()


def _seek_read(fd: int, n: int, offset: int) -> bytes:
    """os.pread where the OS has none (Windows): a seek and a read, under a lock so that threads sharing the
    descriptor do not move its position under each other."""
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def _seek_readv(fd: int, buffers, offset: int) -> int:
    """os.preadv where the OS has none: each buffer filled by _seek_read in turn; the bytes read."""
    total = 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        data = _seek_read(fd, len(view), offset + total)
        view[: len(data)] = data
        total += len(data)
        if len(data) < len(view):
            break
    return total


pread = getattr(os, "pread", _seek_read)
preadv = getattr(os, "preadv", _seek_readv)
