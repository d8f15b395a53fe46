"""Side-by-side with llama.cpp on the synthetic OLMoE-1B-7B-geometry checkpoint (run by `make bench`).

Steps, each a child process timed with its own peak RSS (os.wait4):
  1. write the random-weight bf16 checkpoint (~14 GB) unless it exists;
  2. `moe convert` to 4 bits (after converting the bundled demo, untimed: the quantizer's kernels are compiled
     once per install, as llama.cpp's tools are built once), against llama.cpp's `convert_hf_to_gguf.py` (bf16) + `llama-quantize Q4_0`;
  3. `moe bench --json` against `llama-bench -o json`, same threads, on each of CASES: prefill of 64 and
     512 tokens, decode after 64 and after 1,024 tokens of context; alternately for --rounds rounds (a
     shared machine's noise then falls on both); medians reported. With --kv-cache q8, moe's 8-bit KV cache
     against llama.cpp's (-ctk q8_0 -ctv q8_0, which its flash attention needs: -fa 1).

llama.cpp is found through LLAMA_CPP (see lib/llamacpp.py and README.md here); it is never part of
this repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))
import llamacpp  # noqa: E402  (a folder of this script's, not a package)
from moe.convert.demo import DEMO_SOURCE  # noqa: E402
from pressure import drop_page_cache  # noqa: E402  (a script of this folder's)


def run(cmd: list[str], capture: bool = False) -> tuple[float, int, str]:
    """Run cmd; return (seconds, peak RSS bytes, stdout)."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    out = proc.stdout.read() if capture else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return seconds, usage.ru_maxrss * 1024, out


def read_through(path: Path) -> None:
    """Read a file once, so its pages are in the page cache (a conversion may have pushed them out)."""
    with path.open("rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


# name -> (tokens of context before the prompt, prompt tokens): prefill is timed after the context, decode after both
CASES = {"short": (0, 64), "pp512": (0, 512), "long": (960, 64)}


def ours_and_peer(ours: Path, gguf4: Path, args, depth: int, prompt: int) -> dict:
    """moe bench and llama-bench on the same case: prefill of `prompt` tokens after `depth` of context, and
    decode of --gen-tokens after depth + prompt (llama-bench's -d puts its tg test there)."""
    _, _, out = run(["moe", "bench", str(ours), "--json", "--threads", str(args.threads), "--depth", str(depth),
                     "--prompt-tokens", str(prompt), "--gen-tokens", str(args.gen_tokens), "--kv-cache", args.kv_cache],
                    capture=True)
    moe = json.loads(out)
    peer = {}
    kv = ["-ctk", "q8_0", "-ctv", "q8_0", "-fa", "1"] if args.kv_cache == "q8" else []
    for test, flags in (("prefill_tok_s", ["-p", str(prompt), "-n", "0", "-d", str(depth)]),
                        ("decode_tok_s", ["-p", "0", "-n", str(args.gen_tokens), "-d", str(depth + prompt)])):
        _, _, out = run([str(llamacpp.tool("llama-bench")), "-m", str(gguf4), "-t", str(args.threads), "-r", "3",
                         *flags, *kv, "-o", "json"], capture=True)
        peer[test] = json.loads(out)[0]["avg_ts"]
    return {"moe": {k: moe[k] for k in ("prefill_tok_s", "decode_tok_s", "decode_gb_s")}, "llamacpp": peer}


def save(folder: Path, report: dict) -> None:
    (folder / "compare_llamacpp.json").write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MOE_BENCH_DIR", Path.home() / ".cache/moe/bench")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="moe bench and llama-bench alternately; medians reported")
    ap.add_argument("--skip-convert", action="store_true", help="reuse converted models from an earlier run")
    ap.add_argument("--kv-cache", choices=("auto", "q8"), default="auto",
                    help="both tools' KV cache: their defaults (moe bf16, llama.cpp f16), or both 8-bit")
    args = ap.parse_args()

    if not (llamacpp.ROOT / "build" / "bin" / "llama-bench").exists():
        print(f"compare_llamacpp.py: skipped (no llama.cpp build under {llamacpp.ROOT}; set LLAMA_CPP)")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / "olmoe-synthetic"
    ours = args.dir / "olmoe-synthetic-moe"
    gguf16 = args.dir / "olmoe-synthetic-bf16.gguf"
    gguf4 = args.dir / "olmoe-synthetic-q4_0.gguf"
    report: dict = {"threads": args.threads, "gen_tokens": args.gen_tokens, "kv_cache": args.kv_cache, "cases": CASES}

    if not (src / "config.json").exists():
        run([sys.executable, "-m", "moe.convert.synthetic", str(src)])
    if not args.skip_convert or not ours.exists():
        shutil.rmtree(ours, ignore_errors=True)
        with tempfile.TemporaryDirectory() as tmp:
            run(["moe", "convert", str(DEMO_SOURCE), "-o", str(Path(tmp) / "demo")])
        s, rss, _ = run(["moe", "convert", str(src), "-o", str(ours), "--bits", "4"])
        report["moe_convert"] = {"seconds": round(s, 1), "peak_rss_bytes": rss}
    if not args.skip_convert or not gguf4.exists():
        s1, rss1, _ = run(llamacpp.to_gguf_command(src, gguf16))
        s2, rss2, _ = run([str(llamacpp.tool("llama-quantize")), str(gguf16), str(gguf4), "Q4_0"])
        report["llamacpp_convert"] = {"seconds": round(s1 + s2, 1), "steps_seconds": [round(s1, 1), round(s2, 1)],
                                      "peak_rss_bytes": max(rss1, rss2)}
        gguf16.unlink(missing_ok=True)
    save(args.dir, report)

    # Both start from the page cache, as a model used before does, read into it afresh: pages that had aged there
    # streamed up to a third slower on this VM than the same bytes read in anew (README.md).
    report["page_cache_dropped"] = dropped = os.geteuid() == 0 and Path("/proc/sys/vm/drop_caches").exists()
    if dropped:
        drop_page_cache()
    for f in [*ours.glob("*.bin"), gguf4]:
        read_through(f)
    rounds = report["rounds"] = []  # alternating, so a noisy neighbour slows both rather than one
    for _ in range(args.rounds):
        rounds.append({name: ours_and_peer(ours, gguf4, args, depth, prompt) for name, (depth, prompt) in CASES.items()})
        save(args.dir, report)  # a round at a time: a long run that dies keeps what it measured
    report["medians"] = {name: {side: {k: statistics.median(r[name][side][k] for r in rounds) for k in rounds[0][name][side]}
                                for side in ("moe", "llamacpp")} for name in CASES}
    print(f"{'':28}{'moe':>10}{'llama.cpp':>11}{'ratio':>8}   moe's decode read its weights at")
    for name, (depth, prompt) in CASES.items():
        for k, what in (("prefill_tok_s", f"prefill {prompt} at {depth}"), ("decode_tok_s", f"decode at {depth + prompt}")):
            m = report["medians"][name]
            rate = f"   {m['moe']['decode_gb_s']:.1f} GB/s" if k == "decode_tok_s" else ""
            print(f"{what:28}{m['moe'][k]:10.2f}{m['llamacpp'][k]:11.2f}{m['moe'][k] / m['llamacpp'][k]:8.3f}{rate}")
    if "moe_convert" in report and "llamacpp_convert" in report:
        mc, lc = report["moe_convert"], report["llamacpp_convert"]
        print(f"{'convert seconds':24}{mc['seconds']:12.1f}{lc['seconds']:12.1f}{mc['seconds'] / lc['seconds']:8.3f}")
        print(f"{'convert peak RSS MB':24}{mc['peak_rss_bytes'] / 1e6:12.0f}{lc['peak_rss_bytes'] / 1e6:12.0f}")
    save(args.dir, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
