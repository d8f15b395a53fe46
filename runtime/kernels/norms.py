"""RMSNorm over the last axis, in float32: hidden states, per-head and full-width q/k norms, L2 norm."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import FLAGS


@njit(**FLAGS)
def rmsnorm(x, w, eps, out):
    """out = x * rsqrt(mean(x^2) + eps) * w over the last axis of x (T, n, d); w (d,); out may be x.

    Hidden states are (T, 1, H); Qwen3-MoE's per-head q/k norms (T, nh, hd); OLMoE's full-width
    ones (T, 1, nh*hd); Llama 4's weightless L2 norm passes w = ones.
    """
    T, n, d = x.shape
    for t in range(T):
        for h in range(n):
            ss = np.float32(0.0)
            for i in range(d):
                ss += x[t, h, i] * x[t, h, i]
            r = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
            for i in range(d):
                out[t, h, i] = x[t, h, i] * r * w[i]
