"""Matmul kernel figures: decode GB/s of weight bytes, prefill GFLOP/s (not part of the test suite).

    python tests/bench/bench_kernels.py --threads 2
    python tests/bench/bench_kernels.py --threads 1 q4:2048:1024:1 q8:50304:2048:1

A case is encoding:rows:cols:tokens. Decode cases cycle through copies of the weight totalling more
than the last-level cache, so bytes come from memory. Each figure is the best of --repeat runs, by
wall clock and by the process's CPU time (the latter per thread, and robust to other load).
"""

from __future__ import annotations

import argparse
import time

# isort: off
from moe.runtime.kernels import qmatmul, simd  # before numba: it points numba's cache at these sources' kernels
import numba
import numpy as np
# isort: on
from moe.runtime.layout import QUANT_BITS, Packed, pack_codes

CASES = ["q4:2048:1024:1", "q4:1024:2048:1", "q5:2048:2048:1", "q6:2048:2048:1", "q6:50304:2048:1",
         "q8:50304:2048:1", "q8:2048:2048:1",
         "q4:2048:1024:8", "q4:2048:2048:64", "q8:2048:2048:64", "bf16:2048:2048:1"]
LAST_LEVEL_CACHE = 96 << 20  # bytes cycled through for decode: above any laptop's L3


def packed(enc: str, rows: int, cols: int, rng) -> Packed:
    scales = (rng.random((rows, cols // 32)) * 0.01 + 1e-3).astype(np.float16)
    if enc in ("q4", "q5", "q6"):
        codes = rng.integers(0, 1 << QUANT_BITS[enc], (rows, cols), dtype=np.uint8)
        return Packed(enc, (rows, cols), pack_codes(codes, QUANT_BITS[enc]), scales, 32)
    if enc == "q8":
        return Packed("q8", (rows, cols), rng.integers(-128, 128, (rows, cols), dtype=np.int8), scales, 32)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if enc == "bf16":
        return Packed("bf16", (rows, cols), (w.view(np.uint32) >> 16).astype(np.uint16))
    return Packed(enc, (rows, cols), w.astype(np.float16) if enc == "f16" else w)


def run(case: str, repeat: int, threads: int) -> str:
    enc, rows, cols, T = case.split(":")
    rows, cols, T = int(rows), int(cols), int(T)
    rng = np.random.default_rng(0)
    first = packed(enc, rows, cols, rng)
    copies = max(1, LAST_LEVEL_CACHE // first.nbytes) if T == 1 else 1
    weights = [first] + [packed(enc, rows, cols, rng) for _ in range(copies - 1)]
    x = rng.standard_normal((T, cols)).astype(np.float32)
    out = np.empty((T, rows), np.float32)
    scratch = qmatmul.Scratch(T, cols)
    for p in weights[:2]:
        qmatmul.linear(p, x, out, scratch)
    wall = cpu = float("inf")
    for _ in range(repeat):
        n, w0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - w0 < 0.2:
            for p in weights:
                qmatmul.linear(p, x, out, scratch)
            n += len(weights)
        wall = min(wall, (time.perf_counter() - w0) / n)
        cpu = min(cpu, (time.process_time() - c0) / n / threads)
    flop = 2 * rows * cols * T
    return (f"{enc:4s} {rows:6d} x {cols:<5d} T={T:<3d} {wall * 1e6:9.1f} us  "
            f"{first.nbytes / wall / 1e9:6.2f} GB/s {flop / wall / 1e9:7.1f} GFLOP/s  |  per thread by CPU time: "
            f"{first.nbytes / cpu / 1e9:6.2f} GB/s {flop / cpu / 1e9:7.1f} GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=CASES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    numba.set_num_threads(args.threads)
    path = "x86 AVX2" + (" + VNNI" if simd.has_vnni(simd.target_features()) else "")
    print(f"{args.threads} threads, kernels: {path if simd.target_has_x86_simd() else 'portable vector IR'}")
    for case in args.cases:
        print(run(case, args.repeat, args.threads), flush=True)


if __name__ == "__main__":
    main()
