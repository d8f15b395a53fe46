"""Quality report (run by `make bench`): what 8 and 4 bits cost on the trained models, beside llama.cpp.

For every model of ../shared/models: perplexity on eval-python-stdlib.txt (first 16,384 tokens,
windows of 256, the protocol of `moe perplexity`) at 16, 8 and 4 bits, each as a ratio to 16
bits; the mean KL divergence of the 4-bit next-token distribution from the 16-bit one and how
often their top token agrees; and 4 bits again with the 8-bit KV cache (--kv-cache q8), as a ratio to 4 bits with
the default bfloat16 cache. With --llama-cpp, the same text through llama.cpp's bf16, Q4_0 and
Q4_K_M files (`llama-perplexity -c 256 --chunks 64`, which scores the second half of each window,
so only its ratios compare with ours) and the file sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from moe.convert import convert
from moe.runtime.model import load_model
from moe.runtime.perplexity import perplexity

sys.path.insert(0, str(Path(__file__).parent / "lib"))
import llamacpp  # noqa: E402  (a folder of this script's, not a package)

MODELS = Path(os.environ.get("MOE_SHARED_MODELS", Path(__file__).resolve().parents[3] / "shared" / "models"))
NAMES = ("tinymix", "tinyqwen3moe", "tinyllama4", "tinygptoss")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def divergence(ref, test, ids: np.ndarray, ctx: int) -> tuple[float, float]:
    """Mean KL(ref || test) of next-token distributions and the share of positions whose top token agrees."""
    kl, agree, n = 0.0, 0, 0
    for w in range(ids.size // ctx):
        window = ids[w * ctx: (w + 1) * ctx]
        p, q = log_softmax(ref.logits(window)), log_softmax(test.logits(window))
        kl += float((np.exp(p) * (p - q)).sum())
        agree += int((p.argmax(axis=1) == q.argmax(axis=1)).sum())
        n += window.size
    return kl / n, agree / n


def folder_bytes(folder: Path) -> int:
    """Every file of a converted model, manifest and tokenizer included (a GGUF file holds its tokenizer too)."""
    return sum(f.stat().st_size for f in folder.iterdir())


def llama_perplexity(bins: Path, gguf: Path, text: Path, threads: int) -> float:
    out = subprocess.run([str(bins / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "256",
                          "--chunks", "64", "-t", str(threads)], capture_output=True, text=True, check=True)
    found = re.search(r"Final estimate: PPL = ([\d.]+)", out.stdout + out.stderr)
    if found is None:  # seen once under load; the same command succeeded again
        sys.exit(f"llama-perplexity printed no final estimate for {gguf}:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(found.group(1))


def llama_cpp(root: Path, model: Path, work: Path, text: Path, threads: int) -> dict:
    bins = root / "build" / "bin"
    bf16 = work / f"{model.name}-bf16.gguf"
    if not bf16.exists():
        subprocess.run(llamacpp.to_gguf_command(model, bf16, root=root), check=True, capture_output=True)
    result = {"bf16": llama_perplexity(bins, bf16, text, threads)}
    for q in ("Q4_0", "Q4_K_M"):
        gguf = work / f"{model.name}-{q}.gguf"
        if not gguf.exists():
            subprocess.run([str(bins / "llama-quantize"), str(bf16), str(gguf), q], check=True, capture_output=True)
        ppl = llama_perplexity(bins, gguf, text, threads)
        result[q] = {"ppl": ppl, "ratio": round(ppl / result["bf16"], 4), "file_bytes": gguf.stat().st_size}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/moe/bench/quality")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp source tree with its tools built (see lib/llamacpp.py)")
    ap.add_argument("--models", nargs="*", default=list(NAMES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text = MODELS / "eval-python-stdlib.txt"
    report = {}
    for name in args.models:
        src = MODELS / name
        models, row = {}, {}
        for bits in (16, 8, 4):
            dst = args.work / f"{name}-b{bits}-g{args.group_size}"
            # converted every run (seconds each): a folder left by earlier code would report its scheme, not ours
            convert(str(src), dst, bits=bits, group_size=args.group_size, force=True)
            models[bits] = load_model(dst, threads=args.threads)
            ids = np.array(models[bits].tokenizer.encode(text.read_text()), np.int64)[: args.tokens]
            ppl, scored = perplexity(models[bits], ids, args.ctx)
            row[f"ppl_{bits}"] = round(ppl, 4)
            row[f"bytes_{bits}"] = folder_bytes(dst)
        for bits in (8, 4):
            row[f"ratio_{bits}"] = round(row[f"ppl_{bits}"] / row["ppl_16"], 4)
        row["ppl_4_kv_q8"] = round(perplexity(load_model(dst, threads=args.threads, kv_cache="q8"), ids, args.ctx)[0], 4)
        row["ratio_kv_q8"] = round(row["ppl_4_kv_q8"] / row["ppl_4"], 5)
        row["kl_4"], row["top1_agree_4"] = (round(v, 5) for v in divergence(models[16], models[4], ids, args.ctx))
        row["tokens_scored"] = scored
        if args.llama_cpp:
            row["llama_cpp"] = llama_cpp(args.llama_cpp, src, args.work, text, args.threads)
        report[name] = row
        print(name, json.dumps(row), flush=True)
    (args.work / "quality.json").write_text(json.dumps(report, indent=1))
    print(f"{'model':14}{'ppl16':>8}{'ppl8':>8}{'ppl4':>8}{'r8':>8}{'r4':>8}{'KL4':>9}{'top1':>7}{'MB4':>7}"
          f"{'Q4_0':>8}{'Q4_K_M':>8}{'MB K_M':>8}{'kv q8':>9}")
    for name, r in report.items():
        lc = r.get("llama_cpp", {})
        q40, qkm = lc.get("Q4_0", {}), lc.get("Q4_K_M", {})
        print(f"{name:14}{r['ppl_16']:8.3f}{r['ppl_8']:8.3f}{r['ppl_4']:8.3f}{r['ratio_8']:8.4f}{r['ratio_4']:8.4f}"
              f"{r['kl_4']:9.5f}{r['top1_agree_4']:7.3f}{r['bytes_4'] / 1e6:7.2f}"
              f"{q40.get('ratio', float('nan')):8.4f}{qkm.get('ratio', float('nan')):8.4f}"
              f"{qkm.get('file_bytes', float('nan')) / 1e6:8.2f}{r['ratio_kv_q8']:9.5f}")


if __name__ == "__main__":
    main()
