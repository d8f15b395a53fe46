"""Machine facts on other systems than this one: a Mac (no /proc, performance cores, F_NOCACHE), a Linux
container under a cgroup memory limit, and Windows (no resource, fcntl, pread, preadv or SIGPIPE)."""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import numpy as np
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
Memory = namedtuple("Memory", "total available")


@pytest.fixture
def mac_memory(monkeypatch):
    """No /proc (as on macOS and Windows), and psutil reporting 16 GiB of which 5 GiB available."""
    real_open = builtins.open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(io, "open", no_proc)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(16 * GIB, 5 * GIB))


def test_available_ram_without_proc_meminfo_is_not_total_memory(mac_memory):
    from moe.runtime import paging

    assert paging.available_ram() == 5 * GIB  # it was physical memory, 16 GiB: every Mac looked empty


def write_cgroups(root: Path, membership: str, limits: dict[str, tuple[str, int, str]]) -> Path:
    """Fake cgroup files under root: {folder: (limit text, usage, memory.stat text)}; returns the membership file."""
    for folder, (limit, usage, stat) in limits.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        v1 = folder.split("/")[0] == "memory"
        (d / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
        (d / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
        (d / "memory.stat").write_text(stat)
    (root / "self-cgroup").write_text(membership)
    return root / "self-cgroup"


def test_cgroup_v2_limit_is_honoured_with_its_ancestors(tmp_path, monkeypatch):
    from moe.runtime import machine, paging

    stat = "anon 1000\nactive_file 100\ninactive_file 200\nshmem 7\n"
    membership = write_cgroups(tmp_path, "0::/app.slice/moe\n", {
        "app.slice": (str(4 * GIB), 3 * GIB, "active_file 0\ninactive_file 0\n"),  # 1 GiB left: the tightest
        "app.slice/moe": (str(2 * GIB), GIB, stat),  # 1 GiB + the 300 bytes of page cache
        "": ("max", 5 * GIB, ""),  # the root: no limit
    })
    assert machine.cgroup_memory(tmp_path, membership) == (4 * GIB, GIB)
    (tmp_path / "app.slice" / "memory.max").write_text("max\n")
    assert machine.cgroup_memory(tmp_path, membership) == (2 * GIB, GIB + 300)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory(16 * GIB, 12 * GIB))
    monkeypatch.setattr(machine, "cgroup_memory", lambda: (2 * GIB, GIB + 300))
    assert paging.available_ram() == GIB + 300


def test_cgroup_v1_limit_of_a_container_mounted_at_its_root(tmp_path):
    from moe.runtime import machine

    # without a cgroup namespace the path names the host's folder, which the container mounts as its root
    membership = write_cgroups(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n", {
        "memory": (str(3 * GIB), 2 * GIB, "total_active_file 1024\ntotal_inactive_file 1024\nactive_file 9\n"),
    })
    assert machine.cgroup_memory(tmp_path, membership) == (3 * GIB, GIB + 2048)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert machine.cgroup_memory(tmp_path, membership) is None
    assert machine.cgroup_memory(tmp_path, tmp_path / "no-such-file") is None  # not Linux


@pytest.mark.parametrize("platform, perflevel0, expected", [
    ("darwin", 8, 8),  # Apple silicon, 8 performance cores of 12
    ("darwin", None, 12),  # an Intel Mac has no performance levels
    ("linux", 8, 12),
    ("win32", None, 12),
])
def test_default_threads_are_the_performance_cores_on_apple_silicon(monkeypatch, platform, perflevel0, expected):
    import numba
    from moe.runtime import machine

    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(machine, "_sysctl_int", {"hw.perflevel0.physicalcpu": perflevel0}.get)
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 12)
    assert machine.default_threads() == expected


def test_load_model_without_threads_sets_the_default(monkeypatch):
    import numba
    from moe.runtime import machine

    saved = numba.get_num_threads()
    monkeypatch.setattr(machine, "default_threads", lambda: 1)
    try:
        assert machine.use_threads() == 1 and numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(saved)


def test_peak_rss_without_the_resource_module(monkeypatch):
    from moe.runtime import machine

    class Process:
        def memory_info(self):
            return namedtuple("Info", "rss peak_wset")(10, 123 << 20)

    monkeypatch.setitem(sys.modules, "resource", None)  # Windows
    monkeypatch.setattr(psutil, "Process", Process)
    assert machine.peak_rss() == 123 << 20


def test_seek_reads_stand_in_for_pread_and_preadv(tmp_path):
    from moe.runtime import machine

    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    fd = machine.open_read(tmp_path / "f")
    try:
        assert machine._seek_read(fd, 100, 9_950) == data[9_950:]  # short at the end, as pread
        a, b = bytearray(3000), np.zeros(5000, np.uint8)
        assert machine._seek_readv(fd, [a, b], 4000) == 6000 == os.preadv(fd, [bytearray(3000), bytearray(5000)], 4000)
        assert bytes(a) + b.tobytes()[:3000] == data[4000:]
    finally:
        os.close(fd)


def test_uncached_open_on_macos_sets_f_nocache(tmp_path, monkeypatch):
    import fcntl

    from moe.runtime import machine

    calls = []
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.delattr(fcntl, "F_NOCACHE", raising=False)  # older Pythons lack the constant
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((cmd, arg)))
    (tmp_path / "f").write_bytes(b"x")
    fd = machine.open_uncached(tmp_path / "f")
    os.close(fd)
    assert calls == [(48, 1)]


def _run(code: str, tmp_path: Path, popen: bool = False, **kwargs):
    """`python -c code` in the repository with its own moe home and tmp_path importable (subprocess.run's
    result, or the Popen when `popen`)."""
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "MOE_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    env.pop("MOE_DEBUG", None)
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(command, env=env, cwd=REPO, **kwargs) if popen else subprocess.run(
        command, env=env, cwd=REPO, **kwargs)


def test_kernel_tests_collect_where_host_cpu_features_raise(tmp_path):
    """llvmlite raises RuntimeError where LLVM cannot read the host's features (macOS arm64)."""
    (tmp_path / "raising_features.py").write_text(textwrap.dedent("""
        import llvmlite.binding

        def get_host_cpu_features():
            raise RuntimeError("failed to get host cpu features")

        llvmlite.binding.get_host_cpu_features = get_host_cpu_features
    """))
    done = _run("""
        import sys, pytest
        sys.exit(pytest.main(["-p", "raising_features", "--collect-only", "-q", "-o", "addopts=", "-p",
                              "no:cacheprovider", "tests/test_qmatmul.py"]))
    """, tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tests collected" in done.stdout and "error" not in done.stdout.lower()


def _without_posix(tokens: int) -> str:
    """A program that removes what Windows lacks, then runs the demo paged through moe's CLI."""
    args = ["run", "def add(a, b):", "--memory-budget", "1MB", "--max-tokens", str(tokens), "--temperature", "0"]
    return textwrap.dedent(f"""
        import collections, os, signal, sys
        import psutil  # first: its Linux backend uses resource; its Windows one does not, and gives peak_wset
        psutil.Process.memory_info = lambda self: collections.namedtuple("pmem", "rss peak_wset")(1, 2 << 20)
        sys.modules["resource"] = sys.modules["fcntl"] = None
        del os.pread, os.preadv, signal.SIGPIPE
        from moe.cli import main
        sys.exit(main({args!r}))
    """)


def test_demo_runs_paged_without_posix_only_modules(tmp_path):
    """As on Windows: no resource or fcntl module, no os.pread / os.preadv, no signal.SIGPIPE. The demo runs
    with its experts paged (positioned reads), and a closed stdout still exits 141."""
    done = _run(_without_posix(12), tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    proc = _run(_without_posix(400), tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, popen=True)
    assert proc.stdout.read(1)
    proc.stdout.close()  # like `moe run ... | head -c 1`
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()[-3000:]


def test_release_where_madvise_cannot_drop_pages_maps_the_file_anew(tmp_path, monkeypatch):
    """As on macOS (MADV_DONTNEED only deactivates) and Windows (no madvise): a released tensor's pages leave the
    process once its views are gone, and views taken before the release still read the right values."""
    from moe.convert import safetensors_io
    from safetensors.numpy import save_file

    big = np.arange(16 << 20, dtype=np.float32)  # 64 MiB
    small = np.arange(1000, dtype=np.float32)
    save_file({"big": big, "small": small}, tmp_path / "m.safetensors")
    monkeypatch.setattr(safetensors_io, "DONTNEED_DROPS", False)
    f = safetensors_io.SafetensorsFile(tmp_path / "m.safetensors")
    process = psutil.Process()
    before = process.memory_info().rss
    view, kept = f.raw("big"), f.raw("small")
    assert view.sum(dtype=np.float64) == big.sum(dtype=np.float64)  # every page of it read in
    assert process.memory_info().rss - before > 48 << 20
    f.release(f.tensors["big"].begin, f.tensors["big"].end)
    assert np.array_equal(kept, small) and np.array_equal(f.raw("small"), small)
    del view, kept  # the old map goes with its last view
    assert process.memory_info().rss - before < 8 << 20
    f.close()
