"""Decode under real memory pressure (run by `make bench`): moe's expert paging against llama.cpp's plain mmap.

A laptop whose model does not fit in RAM, made on purpose: before each run the page cache is dropped, then
all RAM but --free GB is held by another process (private anonymous memory, every page written, so
MemAvailable really reads --free GB: checked before the run starts; `mmap.mmap(-1, n)` alone would be shared
memory and barely move it). The two tools then decode the synthetic OLMoE-1B-7B geometry at 4 bits with the
same threads and the same kind of token stream: seeded random ids, as llama-bench's tg test feeds.

Two routing regimes, since real routing lies between them:
  sticky           random weights as they come: the residual stream forgets the token, experts repeat;
  token-following  embeddings 64x larger (`moe.convert.synthetic --embed-scale 64`): each token routes by its
                   own id, so random tokens reuse few experts.
Each round runs, in turn: `moe bench` with its automatic budget, `moe bench --memory-budget 1GB`, and
`llama-bench`; medians over --rounds. Disk bytes per decoded token count every read of the disk holding the
models during the whole run (/proc/diskstats), load and warm-up included, divided by the tokens decoded.

Needs Linux, root (drop_caches), about 60 GB of free disk, and llama.cpp built (LLAMA_CPP: see README.md here).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))
import llamacpp  # noqa: E402  (a folder of this script's, not a package)

REGIMES = {"sticky": 1, "token-following": 64}  # regime -> embedding scale of the synthetic checkpoint
GB = 10**9

# The other process: private anonymous memory, every page written; it tells when it holds all of it, and
# asks the OOM killer to take the tool under test rather than itself.
HOLDER = """
import mmap, sys
try:
    with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('-1000')
except OSError:
    pass  # a sandbox may refuse it: Pressure then checks after each run that the holder still holds
n = int(sys.argv[1])
held = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b'\\1' * (1 << 20)
for offset in range(0, n - len(chunk) + 1, len(chunk)):
    held[offset:offset + len(chunk)] = chunk
print('held', flush=True)
sys.stdin.read()
"""


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no MemAvailable in /proc/meminfo: this benchmark needs Linux")


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Pressure:
    """All RAM but `free` bytes held by a child process while the block runs (page cache dropped first)."""

    def __init__(self, free: int):
        self.free = free

    def __enter__(self) -> Pressure:
        drop_page_cache()
        hold = mem_available() - self.free
        for _ in range(6):  # memory a finished run gives back late can move MemAvailable: measure, adjust, again
            if hold <= 0:
                raise SystemExit(f"only {mem_available() / GB:.1f} GB available: nothing to hold for --free {self.free / GB}")
            self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(hold)], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
            if self.proc.stdout.readline().strip() != "held":
                raise SystemExit("the memory holder did not start")
            drop_page_cache()  # whatever the holder's start brought in
            time.sleep(1)
            self.available = mem_available()
            if abs(self.available - self.free) <= 0.1 * self.free:
                return self
            self.__exit__()
            hold += self.available - self.free
        raise SystemExit(f"MemAvailable reads {self.available / GB:.2f} GB while holding; wanted {self.free / GB:.2f}")

    def __exit__(self, *exc) -> None:
        self.held_throughout = self.proc.poll() is None  # else the OOM killer took the holder: no pressure
        self.proc.stdin.close()
        self.proc.wait()


def disk_sectors_read(path: Path) -> int:
    """Sectors read so far from the whole disk that holds `path` (/proc/diskstats, 512-byte sectors)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    parent = Path(f"/sys/dev/block/{major}:{minor}/..").resolve() / "dev"
    if (Path(f"/sys/dev/block/{major}:{minor}") / "partition").exists() and parent.exists():
        major, minor = (int(x) for x in parent.read_text().split(":"))
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if int(fields[0]) == major and int(fields[1]) == minor:
            return int(fields[5])
    return 0


def timed(cmd: list[str], disk: Path) -> tuple[str, int, int]:
    """Run cmd; (stdout, its peak RSS, bytes read from the disk meanwhile)."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    before = disk_sectors_read(disk)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "", usage.ru_maxrss * 1024, 0  # killed (out of memory) or failed: no figure
    return out, usage.ru_maxrss * 1024, (disk_sectors_read(disk) - before) * 512


def prepare(folder: Path, scale: int, skip_convert: bool) -> tuple[Path, Path]:
    """The 4-bit moe folder and Q4_0 GGUF of the synthetic checkpoint whose embeddings are `scale` times larger."""
    src, ours, gguf = folder / f"olmoe-x{scale}", folder / f"olmoe-x{scale}-moe", folder / f"olmoe-x{scale}-q4_0.gguf"
    if skip_convert and ours.exists() and gguf.exists():
        return ours, gguf
    if not (src / "config.json").exists():
        subprocess.run([sys.executable, "-m", "moe.convert.synthetic", str(src), "--embed-scale", str(scale)], check=True)
    shutil.rmtree(ours, ignore_errors=True)
    subprocess.run(["moe", "convert", str(src), "-o", str(ours), "--bits", "4"], check=True)
    bf16 = folder / f"olmoe-x{scale}-bf16.gguf"
    subprocess.run(llamacpp.to_gguf_command(src, bf16), check=True)
    subprocess.run([str(llamacpp.tool("llama-quantize")), str(bf16), str(gguf), "Q4_0"], check=True)
    bf16.unlink()
    return ours, gguf


def run_moe(ours: Path, args, budget: str | None) -> dict:
    cmd = ["moe", "bench", str(ours), "--json", "--stream", "random", "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat", "1"]
    out, rss, disk = timed(cmd + (["--memory-budget", budget] if budget else []), ours)
    if not out:
        return {"failed": True, "peak_rss_bytes": rss}
    r = json.loads(out)
    return {"decode_tok_s": r["decode_tok_s"], "hit_rate": r["expert_cache_hit_rate"],
            "expert_bytes_read_per_token": r["expert_bytes_read_per_token"], "peak_rss_bytes": rss,
            "disk_bytes_per_decoded_token": disk / args.gen_tokens, "budget_bytes": r.get("memory_budget_bytes")}


def run_llamacpp(gguf: Path, args) -> dict:
    # plain mmap: by default llama.cpp repacks Q4_0 for AVX2 into anonymous memory, the whole model of it
    cmd = [str(llamacpp.tool("llama-bench")), "-m", str(gguf), "-t", str(args.threads), "-p", "0",
           "-n", str(args.gen_tokens), "-r", "1", "--repack", "0", "--load-mode", "mmap", "-o", "json"]
    out, rss, disk = timed(cmd, gguf)
    if not out:
        return {"failed": True, "peak_rss_bytes": rss}
    decode = next(r["avg_ts"] for r in json.loads(out) if not r["n_prompt"])
    # llama-bench decodes a warm-up run as long as the timed one before it
    return {"decode_tok_s": decode, "peak_rss_bytes": rss, "disk_bytes_per_decoded_token": disk / (2 * args.gen_tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MOE_BENCH_DIR", Path.home() / ".cache/moe/bench")))
    ap.add_argument("--free", type=float, default=2.0, help="GB of RAM left available to the tools")
    ap.add_argument("--budget", default="1GB", help="the explicit --memory-budget measured beside the automatic one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated: " + ", ".join(REGIMES))
    ap.add_argument("--skip-convert", action="store_true", help="reuse the folders and GGUF files of an earlier run")
    args = ap.parse_args()
    if sys.platform != "linux" or os.geteuid() != 0:
        print("pressure.py: skipped (it needs Linux and root, to drop the page cache)")
        return
    if not (llamacpp.ROOT / "build" / "bin" / "llama-bench").exists():
        print(f"pressure.py: skipped (no llama.cpp build under {llamacpp.ROOT}; set LLAMA_CPP)")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    runners = {"moe auto": lambda m, g: run_moe(m, args, None),
               f"moe {args.budget}": lambda m, g: run_moe(m, args, args.budget),
               "llama.cpp mmap": lambda m, g: run_llamacpp(g, args)}
    report = {"free_bytes": int(args.free * GB), "threads": args.threads, "gen_tokens": args.gen_tokens, "regimes": {}}
    for regime in args.regimes.split(","):
        ours, gguf = prepare(args.dir, REGIMES[regime], args.skip_convert)
        run_moe(ours, args, None)  # compiles the kernels, if the cache is cold, before anything is timed
        rounds = []
        for _ in range(args.rounds):  # alternating, so the machine's noise falls on every tool alike
            one = {}
            for name, runner in runners.items():
                with Pressure(int(args.free * GB)) as held:
                    one[name] = runner(ours, gguf) | {"mem_available_bytes": held.available}
                if not held.held_throughout:
                    one[name] = {"failed": True, "why": "the memory holder was killed mid-run"}
                time.sleep(1)
            rounds.append(one)
        report["regimes"][regime] = {"rounds": rounds, "median": _medians(rounds)}
    _print(report)
    (args.dir / "pressure.json").write_text(json.dumps(report, indent=1))


def _medians(rounds: list[dict]) -> dict:
    out = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if not r[name].get("failed")]
        out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))
                     and all(r.get(k) is not None for r in runs)} if runs else {"failed": True}
    return out


def _print(report: dict) -> None:
    print(f"decode under pressure: {report['free_bytes'] / GB:.1f} GB available, {report['threads']} threads, "
          f"random tokens, medians")
    print(f"{'regime':17}{'tool':18}{'tok/s':>8}{'ratio':>7}{'hit':>7}{'expert MB/tok':>14}{'disk MB/tok':>12}"
          f"{'peak RSS GB':>12}")
    for regime, r in report["regimes"].items():
        peer = r["median"]["llama.cpp mmap"].get("decode_tok_s")
        for name, m in r["median"].items():
            if m.get("failed"):
                print(f"{regime:17}{name:18}  failed (out of memory?)")
                continue
            ratio = m["decode_tok_s"] / peer if peer else float("nan")
            hit = f"{m['hit_rate']:.3f}" if "hit_rate" in m else "-"
            expert = f"{m['expert_bytes_read_per_token'] / 1e6:.1f}" if "expert_bytes_read_per_token" in m else "-"
            print(f"{regime:17}{name:18}{m['decode_tok_s']:8.2f}{ratio:7.2f}{hit:>7}{expert:>14}"
                  f"{m['disk_bytes_per_decoded_token'] / 1e6:12.1f}{m['peak_rss_bytes'] / GB:12.2f}")


if __name__ == "__main__":
    main()
