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
from moe.runtime.speed import random_packed

CASES = ["q4:2048:1024:1", "q4:1024:2048:1", "q5:2048:2048:1", "q6:2048:2048:1", "q6:50304:2048:1",
         "q8:50304:2048:1", "q8:2048:2048:1",
         "q4:2048:1024:8", "q4:2048:2048:64", "q8:2048:2048:64", "bf16:2048:2048:1"]
LAST_LEVEL_CACHE = 96 << 20  # bytes cycled through for decode: above any laptop's L3


def run(case: str, repeat: int, threads: int) -> str:
    enc, rows, cols, T = case.split(":")
    rows, cols, T = int(rows), int(cols), int(T)
    rng = np.random.default_rng(0)
    first = random_packed(enc, (rows, cols), 32, rng)
    copies = max(1, LAST_LEVEL_CACHE // first.nbytes) if T == 1 else 1
    weights = [first] + [random_packed(enc, (rows, cols), 32, rng) for _ in range(copies - 1)]
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
