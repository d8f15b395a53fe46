"""The parallel kernels give the same bits compiled afresh as loaded from numba's cache.

A process that compiles a parallel kernel runs the copy of its loop that numba compiled on its own; a process
that loads the kernel from the cache runs the copy compiled into the kernel. With reassociating fast-math, LLVM
summed differently in the two, and a prompt's logits depended on whether its process had compiled the kernels.
Two subprocesses share an empty kernel cache: the first compiles, the second loads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

SCRIPT = """
import sys
import numpy as np
from moe.runtime.kernels.attention import attend, per_head
from moe.runtime.kernels.deltanet import delta_rule_chunked, delta_rule_step
from moe.runtime.kernels.qmatmul import Scratch, linear, linear_each
from moe.runtime.layout import Packed

rng = np.random.default_rng(5)
out = {}
T, nh, nkv, hd, P = 64, 8, 2, 40, 128
q = rng.standard_normal((T, nh, hd)).astype(np.float32)
k, v = ((rng.standard_normal((nkv, P, hd)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) for _ in range(2))
out["attend"] = np.empty((T, nh, hd), np.float32)
attend(q, k, v, 3, 0.17, 0, 0, np.zeros(nh, np.float32), False, out["attend"])
out["per_head"] = np.empty((T, nh, 24), np.float32)
per_head(q, rng.standard_normal((nh, 24, hd)).astype(np.float32), out["per_head"])

def q4(rows, cols_pad):
    groups = cols_pad // 32
    scales = rng.integers(-127, 128, (rows, groups)).astype(np.int8)
    supers = (np.full((rows, -(-groups // 8)), 0.01, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return Packed("q4", (rows, cols_pad), rng.integers(0, 256, (rows, cols_pad // 2), dtype=np.uint8), scales, 32, supers)

w = [q4(40, 2080) for _ in range(2)]
x = rng.standard_normal((11, 2080)).astype(np.float32)
for name, tokens in (("prefill", 11), ("one", 1)):
    out[name] = np.empty((tokens, 40), np.float32)
    linear(w[0], x[:tokens], out[name], Scratch())
out["each"] = np.empty((2, 40), np.float32)
linear_each(w, x[:2], out["each"], Scratch())
bf16 = (rng.standard_normal((40, 2080)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
out["bf16"] = np.empty((11, 40), np.float32)
linear(Packed("bf16", (40, 2080), bf16), x, out["bf16"], Scratch())

dq, dk, dv = (rng.standard_normal((T, 2, 16)).astype(np.float32) for _ in range(3))
g = np.log(rng.uniform(0.9, 0.99, (T, 2))).astype(np.float32)
beta = rng.uniform(0.0, 1.0, (T, 2)).astype(np.float32)
for name, rule in (("step", delta_rule_step), ("chunked", delta_rule_chunked)):
    state = np.zeros((2, 16, 16), np.float32)
    out[name] = np.zeros((T, 2, 16), np.float32)
    rule(dq, dk, dv, g, beta, 0.25, state, out[name])
np.savez(sys.argv[1], **out)
"""


def test_parallel_kernels_give_the_same_bits_compiled_afresh_and_from_the_cache(tmp_path):
    script = tmp_path / "kernels.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "kernels"), NUMBA_NUM_THREADS="2")
    runs = []
    for name in ("afresh", "cached"):
        saved = tmp_path / f"{name}.npz"
        done = subprocess.run([sys.executable, str(script), str(saved)], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(np.load(saved))
    assert sorted(runs[0].files) == sorted(runs[1].files)
    for key in runs[0].files:
        assert np.isfinite(runs[0][key]).all(), key
        assert np.array_equal(runs[0][key].view(np.uint32), runs[1][key].view(np.uint32)), key
