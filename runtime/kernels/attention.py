"""Grouped-query attention over a KV cache: causal, sliding-window or chunked, with optional sinks.

One pass per (token, head) with an online softmax, so no score buffer grows with the context.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import FLAGS, PARALLEL


@njit(**PARALLEL)
def attend(q, k_cache, v_cache, pos0, scale, window, chunk, sinks, use_sinks, out):
    """out (T, nh, hd) = softmax(q k^T * scale) v for q (T, nh, hd) at positions pos0 .. pos0+T-1.

    k_cache, v_cache (nkv, P, hd) already hold keys and values up to position pos0+T-1. Query
    head h reads kv head h // (nh / nkv). Token i sees j <= i, and also i - j < window when
    window > 0 (sliding), and i // chunk == j // chunk when chunk > 0 (chunked). With use_sinks,
    sinks[h] joins each row of scores as one more logit whose probability is then dropped.
    """
    T, nh, hd = q.shape
    group = nh // k_cache.shape[0]
    for th in prange(T * nh):
        t = th // nh
        h = th % nh
        kv = h // group
        i = pos0 + t
        start = 0
        if window > 0:
            start = max(0, i - window + 1)
        if chunk > 0:
            start = max(start, (i // chunk) * chunk)
        acc = out[t, h]
        acc[:] = 0.0
        m = np.float32(-np.inf)
        total = np.float32(0.0)
        for j in range(start, i + 1):
            s = np.float32(0.0)
            for d in range(hd):
                s += q[t, h, d] * k_cache[kv, j, d]
            s *= scale
            if s > m:
                c = np.float32(math.exp(m - s))
                total *= c
                for d in range(hd):
                    acc[d] *= c
                m = s
            p = np.float32(math.exp(s - m))
            total += p
            for d in range(hd):
                acc[d] += p * v_cache[kv, j, d]
        if use_sinks:
            s = sinks[h]
            if s > m:
                c = np.float32(math.exp(m - s))
                total *= c
                for d in range(hd):
                    acc[d] *= c
                m = s
            total += np.float32(math.exp(s - m))
        r = np.float32(1.0) / total
        for d in range(hd):
            acc[d] *= r


@njit(**FLAGS)
def temperature(q, pos0, attn_scale, floor_scale):
    """Llama 4 NoPE layers: q (T, nh, hd) at position p scaled by 1 + attn_scale * log1p(floor((p + 1) / floor_scale))."""
    T, nh, hd = q.shape
    for t in range(T):
        f = np.float32(math.log1p(math.floor(np.float32(pos0 + t + 1.0) / np.float32(floor_scale))))
        f = f * np.float32(attn_scale) + np.float32(1.0)
        for h in range(nh):
            for d in range(hd):
                q[t, h, d] *= f
