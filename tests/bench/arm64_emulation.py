"""arm64 under emulation (run by `make bench`): the kernel tests and the demo on Debian arm64 under qemu-user,
and the demo's logits, whole and paged (--memory-budget), compared with this machine's.

The arm64 kernels run twice: compiled for apple-m1 (sdot: simd's "dotprod" path) and for apple-m1 without
dotprod (the portable path); the two should give the same logits bit for bit (same integer sums, same float steps).
Against x86 the float reductions of the other kernels are vectorized at another width, so the figure there
is the largest difference and whether the greedy tokens agree.

Needs qemu-user-static with binfmt and an arm64 root (MOE_ARM64_ROOT, default /opt/arm64-root) holding a venv
/venv with this machine's versions of the wheels; as root, `python tests/bench/arm64_emulation.py --setup`
makes it from Debian's packages (debootstrap) and PyPI (aarch64 wheels). Without them it says it is skipped.
Slow: numba compiles every kernel under emulation (about an hour on 2 cores for all of it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(os.environ.get("MOE_ARM64_ROOT", "/opt/arm64-root"))
REPO = Path(__file__).resolve().parents[2]
# (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES): one CPU model for both paths, so that only the dot products differ
CPUS = {"dotprod": ("apple-m1", ""), "portable": ("apple-m1", "-dotprod")}
PROMPT = "def fibonacci(n):"
# per path: test_arm64_asm reads the IR compiled by llvmlite for apple-m1, the same whatever numba compiles for
KERNEL_TESTS = {"dotprod": ["tests/test_qmatmul.py", "tests/test_arm64_asm.py"], "portable": ["tests/test_qmatmul.py"]}


def missing() -> str | None:
    """Why the emulated run cannot happen here, or None."""
    if sys.platform != "linux":
        return "qemu-user runs on Linux only"
    if not shutil.which("qemu-aarch64-static"):
        return "no qemu-aarch64-static (apt-get install qemu-user-static binfmt-support)"
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64)"
    if not (ROOT / "venv/bin/python").exists():
        return f"no arm64 root with a venv at {ROOT} (run this script with --setup, as root)"
    if os.geteuid() != 0:
        return "chroot needs root"
    return None


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, **kw)


def pins() -> list[str]:
    """The project's dependencies and the test runner, at this machine's versions."""
    names = {re.split(r"[ ;<>=!~\[]", r)[0] for r in metadata.requires("moe-cpu") if "extra ==" not in r}
    return [f"{name}=={metadata.version(name)}" for name in sorted(names | {"pytest", "hypothesis"})]


def setup() -> None:
    """qemu-user-static and binfmt, a minimal Debian arm64 root, and a venv of this machine's wheel versions."""
    run(["apt-get", "install", "-y", "qemu-user-static", "debootstrap", "binfmt-support"])
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        run(["mount", "binfmt_misc", "-t", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
    run(["update-binfmts", "--enable", "qemu-aarch64"])
    if not (ROOT / "usr/bin/python3").exists():
        run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(ROOT), "http://deb.debian.org/debian"])
    shutil.copy("/etc/resolv.conf", ROOT / "etc/resolv.conf")
    for ca in Path("/usr/local/share/ca-certificates").glob("*.crt"):  # a local TLS proxy's, where there is one
        shutil.copy(ca, ROOT / "usr/local/share/ca-certificates" / ca.name)
    run(["chroot", str(ROOT), "update-ca-certificates"])
    if not (ROOT / "venv/bin/python").exists():
        run(["chroot", str(ROOT), "/usr/bin/python3", "-m", "venv", "/venv"])


def mount_kernel_filesystems() -> None:
    """/proc and /sys in the root: psutil reads available memory from /proc/meminfo, the budget cgroup limits
    from /sys/fs/cgroup (mounts do not outlive a reboot, so this is done on every run, not by --setup)."""
    for kind, where in (("proc", "proc"), ("sysfs", "sys")):
        if not os.path.ismount(ROOT / where):
            run(["mount", "-t", kind, kind, str(ROOT / where)])


def install_tree() -> None:
    """This working tree (tracked and new files) into the root at /src, installed into its venv."""
    src = ROOT / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("moe_cpu.egg-info"):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    run(["chroot", str(ROOT), "/venv/bin/pip", "install", "-q", "--only-binary=:all:", *pins()])
    run(["chroot", str(ROOT), "/venv/bin/pip", "install", "-q", "--no-deps", "/src"])


def in_root(isa: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cpu, features = CPUS[isa]
    env = ["HOME=/root", f"NUMBA_CPU_NAME={cpu}", f"NUMBA_CPU_FEATURES={features}", f"NUMBA_CACHE_DIR=/root/numba-cache-{isa}",
           "MOE_HOME=/root/moe"]
    return run(["chroot", str(ROOT), "/usr/bin/env", *env, "sh", "-c", "cd /src && " + " ".join(args)], check)


def logits(out: str) -> None:
    """(child) The demo's logits for PROMPT, whole and with the smallest memory budget, into out (.npz)."""
    from moe.convert.demo import demo_model
    from moe.runtime.kernels import simd
    from moe.runtime.model import load_model
    from moe.runtime.paging import min_budget

    folder = demo_model()
    whole = load_model(folder)
    ids = np.asarray(whole.tokenizer.encode(PROMPT))
    paged = load_model(folder, memory_budget=min_budget(whole.layout))
    np.savez(out, whole=whole.logits(ids), paged=paged.logits(ids), isa=simd.target_isa())


def compare(name: str, a: dict, b: dict) -> None:
    for part in ("whole", "paged"):
        x, y = a[part], b[part]
        same = np.array_equal(x.view(np.uint32), y.view(np.uint32))
        argmax = np.array_equal(x.argmax(axis=1), y.argmax(axis=1))
        diff = np.abs(x - y).max()
        print(f"{name:32} {part:6} identical {str(same):5}  max |diff| {diff:.3g}  "
              f"relative to max |logit| {diff / np.abs(y).max():.3g}  greedy tokens agree {argmax}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="make the arm64 root (root; downloads)")
    parser.add_argument("--logits", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--no-tests", action="store_true", help="only the logits")
    args = parser.parse_args()
    if args.logits:
        logits(args.logits)
        return 0
    if args.setup:
        setup()
    reason = missing()
    if reason:
        print(f"skipped: {reason}")
        return 0
    mount_kernel_filesystems()
    install_tree()
    results = {}
    for isa in CPUS:
        in_root(isa, f"/venv/bin/python tests/bench/arm64_emulation.py --logits /tmp/logits-{isa}.npz")
        results[f"arm64 {isa}"] = dict(np.load(ROOT / f"tmp/logits-{isa}.npz"))
        print(f"arm64 {CPUS[isa]}: kernels {results[f'arm64 {isa}']['isa']}")
    host = Path("/tmp/logits-x86.npz")
    run([sys.executable, __file__, "--logits", str(host)])
    results["x86"] = dict(np.load(host))
    compare("arm64 dotprod vs arm64 portable", results["arm64 dotprod"], results["arm64 portable"])
    compare("arm64 dotprod vs x86 " + str(results["x86"]["isa"]), results["arm64 dotprod"], results["x86"])
    if args.no_tests:
        return 0
    # after the logits, and each path whatever the other gave: a failing test still leaves every figure
    failed = [isa for isa in CPUS if in_root(isa, "/venv/bin/python -m pytest -q -p no:cacheprovider",
                                             *KERNEL_TESTS[isa], check=False).returncode]
    print("kernel tests under emulation:", f"failed on {', '.join(failed)}" if failed else "passed on both paths")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
