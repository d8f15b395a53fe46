"""Qwen3.5-35B-A3B's geometry at its real size (run by `make bench`): `moe plan`, then `moe bench` with the
automatic budget, on the whole machine and as a 16 GB laptop would have it.

The checkpoint is the synthetic generator's (random weights, `moe.convert.synthetic --geometry qwen3.5-35b-a3b`):
40 layers (30 Gated DeltaNet, 10 gated attention), 256 experts of width 512 and a shared one, top-8. Its bf16
source is ~70 GB; where the disk cannot hold that beside the ~20 GB layout, the source is written as the Hub's
FP8 checkpoints are (`--fp8`, ~36 GB), and the report says which. The 4-bit layout is larger than the free RAM
of most laptops: the experts page.

Each condition drops the page cache first; `--free` conditions also hold all RAM but that many GB in another
process (tests/bench/pressure.py's holder). Reported per run: decode and prefill tok/s (random-token decode, as
llama-bench), the budget moe chose, hit rate, expert bytes read per decoded token, disk bytes per decoded token
over the whole process, peak RSS. Needs Linux and root for the pressure conditions, and ~60 GB of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from pressure import GB, Pressure, drop_page_cache, mem_available, timed  # a script of this folder's

GEOMETRY = "qwen3.5-35b-a3b"
BF16_SOURCE, LAYOUT = 70 * GB, 20 * GB  # about, at 40 layers


def prepare(folder: Path, layers: int, keep_source: bool) -> tuple[Path, dict]:
    """The 4-bit layout of the first `layers` layers (converted here if absent), and what making it took."""
    name = f"qwen35-{layers}l"
    src, ours, record = folder / f"{name}-src", folder / f"{name}-moe", folder / f"{name}-made.json"
    made = json.loads(record.read_text()) if record.exists() else {}
    if (ours / "manifest.json").exists():
        return ours, made
    if not (src / "config.json").exists():
        fp8 = shutil.disk_usage(folder).free < (BF16_SOURCE + LAYOUT) * layers / 40 + 5 * GB
        cmd = [sys.executable, "-m", "moe.convert.synthetic", str(src), "--geometry", GEOMETRY, "--layers", str(layers)]
        cmd += ["--fp8"] * fp8
        subprocess.run(cmd, check=True)
    made["layers"] = layers
    made["source"] = "fp8" if "quantization_config" in json.loads((src / "config.json").read_text()) else "bf16"
    made["source_bytes"] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    plan, _, _ = timed(["moe", "plan", str(src), "--json"], src)
    made["plan"] = json.loads(plan)
    drop_page_cache()
    _, rss, _ = timed(["moe", "convert", str(src), "-o", str(ours), "--bits", "4"], src)
    made["convert"] = {"peak_rss_bytes": rss, "seconds": json.loads((ours / "manifest.json").read_text())["stats"]["seconds"]}
    made["layout_bytes"] = sum(f.stat().st_size for f in ours.iterdir() if f.is_file())
    record.write_text(json.dumps(made, indent=1))
    if not keep_source:
        shutil.rmtree(src)
    return ours, made


def bench(ours: Path, args) -> dict:
    cmd = ["moe", "bench", str(ours), "--json", "--stream", "random", "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--repeat", "1"]
    out, rss, disk = timed(cmd, ours)
    if not out:
        return {"failed": True, "peak_rss_bytes": rss}
    r = json.loads(out)
    return {"decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
            "budget_bytes": r.get("memory_budget_bytes"), "hit_rate": r["expert_cache_hit_rate"],
            "expert_bytes_read_per_token": r["expert_bytes_read_per_token"], "peak_rss_bytes": rss,
            "disk_bytes_per_decoded_token": disk / args.gen_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("MOE_BENCH_DIR", Path.home() / ".cache/moe/bench")))
    ap.add_argument("--free", default="8", help="comma-separated GB of RAM left available, beside the whole machine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=40,
                    help="fewer layers than the geometry's 40 (each as it has them), where converting 40 takes too long")
    ap.add_argument("--keep-source", action="store_true", help="keep the synthetic source after converting it")
    args = ap.parse_args()
    if sys.platform != "linux" or os.geteuid() != 0:
        print("qwen35.py: skipped (it needs Linux and root, to drop the page cache)")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    ours, made = prepare(args.dir, args.layers, args.keep_source)
    bench(ours, args)  # compiles the kernels, if the cache is cold, before anything is timed
    conditions = {"whole machine": None, **{f"{f} GB free": float(f) * GB for f in args.free.split(",") if f}}
    report = {"made": made, "threads": args.threads, "conditions": {}}
    for name, free in conditions.items():
        runs = []
        for _ in range(args.rounds):
            if free is None:
                drop_page_cache()
                runs.append(bench(ours, args) | {"mem_available_bytes": mem_available()})
                continue
            with Pressure(int(free)) as held:
                runs.append(bench(ours, args) | {"mem_available_bytes": held.available})
        ok = [r for r in runs if not r.get("failed")]
        median = {k: statistics.median(r[k] for r in ok) for k in ok[0] if ok[0][k] is not None} if ok else {}
        report["conditions"][name] = {"runs": runs, "median": median}
    _print(report)
    (args.dir / f"qwen35-{args.layers}l.json").write_text(json.dumps(report, indent=1))


def _print(report: dict) -> None:
    made = report["made"]
    if made:
        c = made["convert"]
        print(f"{made['layers']} layers; source: {made['source']}, {made['source_bytes'] / GB:.1f} GB; layout {made['layout_bytes'] / GB:.1f} GB;"
              f" converted in {c['seconds']:.0f} s, peak RSS {c['peak_rss_bytes'] / GB:.2f} GB")
    print(f"{'condition':16}{'avail GB':>9}{'budget GB':>10}{'decode':>8}{'prefill':>8}{'hit':>7}{'expert MB/tok':>14}"
          f"{'disk MB/tok':>12}{'peak RSS GB':>12}")
    for name, r in report["conditions"].items():
        for i, run in enumerate(r["runs"] + [r["median"]]):
            label = f"{name} {'median' if i == len(r['runs']) else i + 1}"
            if run.get("failed") or not run:
                print(f"{label:16}  failed")
                continue
            budget = f"{run['budget_bytes'] / GB:.2f}" if run.get("budget_bytes") else "mapped"
            print(f"{label:16}{run['mem_available_bytes'] / GB:9.1f}{budget:>10}{run['decode_tok_s']:8.2f}"
                  f"{run['prefill_tok_s']:8.2f}{run['hit_rate']:7.3f}{run['expert_bytes_read_per_token'] / 1e6:14.1f}"
                  f"{run['disk_bytes_per_decoded_token'] / 1e6:12.1f}{run['peak_rss_bytes'] / GB:12.2f}")


if __name__ == "__main__":
    main()
