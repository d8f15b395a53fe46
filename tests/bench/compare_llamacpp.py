"""Side-by-side with llama.cpp on the synthetic OLMoE-1B-7B-geometry checkpoint (run by `make bench`).

Steps, each a child process timed with its own peak RSS (os.wait4):
  1. write the random-weight bf16 checkpoint (~14 GB) unless it exists;
  2. `moe convert` to 4 bits, against llama.cpp's `convert_hf_to_gguf.py` (bf16) + `llama-quantize Q4_0`;
  3. `moe bench --json` against `llama-bench -o json`, same prompt, generation length and threads,
     alternately for --rounds rounds (a shared machine's noise then falls on both); medians reported.

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "lib"))
import llamacpp  # noqa: E402  (a folder of this script's, not a package)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MOE_BENCH_DIR", Path.home() / ".cache/moe/bench")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="moe bench and llama-bench alternately; medians reported")
    ap.add_argument("--skip-convert", action="store_true", help="reuse converted models from an earlier run")
    args = ap.parse_args()

    if not (llamacpp.ROOT / "build" / "bin" / "llama-bench").exists():
        print(f"compare_llamacpp.py: skipped (no llama.cpp build under {llamacpp.ROOT}; set LLAMA_CPP)")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / "olmoe-synthetic"
    ours = args.dir / "olmoe-synthetic-moe"
    gguf16 = args.dir / "olmoe-synthetic-bf16.gguf"
    gguf4 = args.dir / "olmoe-synthetic-q4_0.gguf"
    report: dict = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens}

    if not (src / "config.json").exists():
        run([sys.executable, "-m", "moe.convert.synthetic", str(src)])
    if not args.skip_convert or not ours.exists():
        shutil.rmtree(ours, ignore_errors=True)
        s, rss, _ = run(["moe", "convert", str(src), "-o", str(ours), "--bits", "4"])
        report["moe_convert"] = {"seconds": round(s, 1), "peak_rss_bytes": rss}
    if not args.skip_convert or not gguf4.exists():
        s1, rss1, _ = run(llamacpp.to_gguf_command(src, gguf16))
        s2, rss2, _ = run([str(llamacpp.tool("llama-quantize")), str(gguf16), str(gguf4), "Q4_0"])
        report["llamacpp_convert"] = {"seconds": round(s1 + s2, 1), "steps_seconds": [round(s1, 1), round(s2, 1)],
                                      "peak_rss_bytes": max(rss1, rss2)}
        gguf16.unlink(missing_ok=True)

    for f in [*ours.glob("*.bin"), gguf4]:  # both start from the page cache, as a model used before does
        read_through(f)
    rounds = []  # alternating, so a noisy neighbour slows both rather than one
    for _ in range(args.rounds):
        _, _, out = run(["moe", "bench", str(ours), "--json", "--threads", str(args.threads),
                         "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)], capture=True)
        ours_run = json.loads(out)
        _, _, out = run([str(llamacpp.tool("llama-bench")), "-m", str(gguf4), "-t", str(args.threads), "-p",
                         str(args.prompt_tokens), "-n", str(args.gen_tokens), "-o", "json"], capture=True)
        llama = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in json.loads(out)}
        rounds.append((ours_run, {"prefill_tok_s": llama.get("prefill"), "decode_tok_s": llama.get("decode")}))
    report["rounds"] = [{"moe": {k: o[k] for k in ("prefill_tok_s", "decode_tok_s", "ttft_s")}, "llamacpp": p}
                        for o, p in rounds]
    report["moe_bench"] = {**rounds[0][0], **{k: statistics.median(o[k] for o, _ in rounds)
                                              for k in ("prefill_tok_s", "decode_tok_s", "ttft_s")}}
    report["llamacpp_bench"] = {k: statistics.median(p[k] for _, p in rounds) for k in ("prefill_tok_s", "decode_tok_s")}
    ours_b, peer = report["moe_bench"], report["llamacpp_bench"]
    report["ratio"] = {k: round(ours_b[k] / peer[k], 3) for k in ("prefill_tok_s", "decode_tok_s") if peer.get(k)}
    print(f"{'':24}{'moe':>12}{'llama.cpp':>12}{'ratio':>8}")
    for k in ("prefill_tok_s", "decode_tok_s"):
        print(f"{k:24}{ours_b[k]:12.2f}{peer[k]:12.2f}{report['ratio'][k]:8.3f}")
    if "moe_convert" in report and "llamacpp_convert" in report:
        mc, lc = report["moe_convert"], report["llamacpp_convert"]
        print(f"{'convert seconds':24}{mc['seconds']:12.1f}{lc['seconds']:12.1f}{mc['seconds'] / lc['seconds']:8.3f}")
        print(f"{'convert peak RSS MB':24}{mc['peak_rss_bytes'] / 1e6:12.0f}{lc['peak_rss_bytes'] / 1e6:12.0f}")
    (args.dir / "compare_llamacpp.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
