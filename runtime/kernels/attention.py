"""Grouped-query attention over a KV cache: causal, sliding-window or chunked, with optional sinks.

Work goes by (token, kv head): the query heads sharing a kv head read each key and value row
once. When those pairs are fewer than numba's threads (decode, above all latent attention's one
shared kv head), a kv head's query heads are split into parts too, each part reading the rows on
its own thread; a head's sums run in the same order whatever its part, so the output keeps its bits.
Keys come in blocks of BLOCK: their scores, one running-max rescale per block (online
softmax, so nothing grows with the context), and exponentials in a loop LLVM vectorizes. Scores and sums of
exponentials go through simd's float sums, whose order is written out (so the bits do not depend on how the
kernel was compiled): four keys per call where a block has them. A block's values are added into each head's
output by simd.axpy_rows, which holds a pass of output columns in registers over all the block's rows.

A cache holds float32 rows, bfloat16 bits, or int8 codes with a float32 scale per row (q8: absmax / 127, rounded
to nearest): a key's score is then its codes' dot product times its scale, and a value row's weight carries its
scale, so the codes are read as they are stored.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_num_threads, njit, prange

from . import FLAGS, PARALLEL
from .bits import f32_to_bf16
from .expf import exp32
from .simd import axpy_rows, dot1, lane_sum, row_dots

BLOCK = 64


def attend(q, k_cache, v_cache, pos0, scale, window, chunk, sinks, use_sinks, out, k_scales=None, v_scales=None):
    """out (T, nh, hd) = softmax(q k^T * scale) v for q (T, nh, hd) at positions pos0 .. pos0+T-1.

    k_cache, v_cache (nkv, P, hd), float32, bfloat16 bits or int8 codes (cache_rows), already hold keys and values up
    to position pos0+T-1; int8 codes come with their rows' scales k_scales, v_scales (nkv, P). Query head h reads
    kv head h // (nh / nkv). Token i sees j <= i, and also i - j < window when window > 0 (sliding), and
    i // chunk == j // chunk when chunk > 0 (chunked). With use_sinks, sinks[h] joins each row of scores as one
    more logit whose probability is then dropped.
    """
    pairs = max(1, q.shape[0] * k_cache.shape[0])  # (token, kv head)
    group = q.shape[1] // k_cache.shape[0]
    size = -(-group // min(group, -(-get_num_threads() // pairs)))  # a part's query heads: a part for each thread
    if k_scales is None or v_scales is None:
        k_scales = v_scales = np.zeros((k_cache.shape[0], 0), np.float32)  # scales of no position: none
    if (k_scales.shape[-1] > 0) != (k_cache.dtype == np.int8):
        raise ValueError("attend: int8 caches, and only they, come with their rows' scales")
    _attend(q, k_cache, v_cache, k_scales, v_scales, pos0, scale, window, chunk, sinks, use_sinks, size, out)


@njit(**PARALLEL)
def _attend(q, k_cache, v_cache, k_scales, v_scales, pos0, scale, window, chunk, sinks, use_sinks, size, out):
    """attend, each (token, kv head)'s query heads in parts of `size` (numba's get_num_threads would keep the kernel
    from its disk cache); scales of no position: the rows are their values."""
    T, nh, hd = q.shape
    nkv, P = k_cache.shape[0], k_cache.shape[1]
    # scores and values read raw pointers (simd.dot4, axpy_rows): caches that disagree with q must stop here
    if k_cache.shape[2] != hd or v_cache.shape != k_cache.shape or pos0 + T > P or nh % nkv:
        raise ValueError("attend: the caches must be [kv heads, positions >= pos0 + T, hd] for q [T, heads, hd]")
    scaled = k_scales.shape[1] > 0
    if scaled and (k_scales.shape != (nkv, P) or v_scales.shape != (nkv, P)):
        raise ValueError("attend: the rows' scales must be [kv heads, positions] as the caches")
    if out.shape != q.shape:
        raise ValueError("attend: out must be shaped as q")
    group = nh // nkv
    parts = -(-group // size)
    scale = np.float32(scale)
    for item in prange(T * nkv * parts):
        # Alternate early and late tokens, so each thread's contiguous share of a causal prefill is even.
        r = item // (nkv * parts)
        t = r // 2 if r % 2 == 0 else T - 1 - r // 2
        kv = item // parts % nkv
        h0 = kv * group + item % parts * size
        heads = min(size, (kv + 1) * group - h0)
        i = pos0 + t
        start = 0
        if window > 0:
            start = max(0, i - window + 1)
        if chunk > 0:
            start = max(start, (i // chunk) * chunk)
        qt = np.empty((heads, hd), np.float32)  # this part's query heads, contiguous (q may be a strided view)
        for g in range(heads):
            for d in range(hd):
                qt[g, d] = q[t, h0 + g, d]
        p = np.empty((heads, BLOCK), np.float32)  # scores, then their exponentials
        pv = np.empty(BLOCK, np.float32)  # a scaled block's exponentials times its value rows' scales
        m = np.full(heads, -np.inf, np.float32)  # running max per head
        total = np.zeros(heads, np.float32)  # running sum of exponentials per head
        acc = out[t, h0: h0 + heads]  # (heads, hd)
        acc[:] = 0.0
        for j0 in range(start, i + 1, BLOCK):
            n = min(BLOCK, i + 1 - j0)
            for g in range(heads):
                block_max = m[g]
                row_dots(qt[g], k_cache[kv], j0, n, p[g])
                if scaled:
                    for jj in range(n):
                        p[g, jj] *= k_scales[kv, j0 + jj]
                for jj in range(n):
                    p[g, jj] *= scale
                    block_max = max(block_max, p[g, jj])
                c = exp32(m[g] - block_max)
                m[g] = block_max
                for d in range(hd):
                    acc[g, d] *= c
                for jj in range(n):
                    p[g, jj] = exp32(p[g, jj] - block_max)
                total[g] = total[g] * c + lane_sum(p[g, :n])
            for g in range(heads):
                if scaled:
                    for jj in range(n):
                        pv[jj] = p[g, jj] * v_scales[kv, j0 + jj]
                    axpy_rows(acc[g], pv, v_cache[kv], j0, n)
                else:
                    axpy_rows(acc[g], p[g], v_cache[kv], j0, n)
        for g in range(heads):
            if use_sinks:
                s = sinks[h0 + g]
                if s > m[g]:
                    c = exp32(m[g] - s)
                    total[g] *= c
                    for d in range(hd):
                        acc[g, d] *= c
                    m[g] = s
                total[g] += exp32(s - m[g])
            inv = np.float32(1.0) / total[g]
            for d in range(hd):
                acc[g, d] *= inv


def cache_rows(x, cache, pos0, scales=None):
    """cache[h, pos0 + t] = x[t, h] for x (T, n, d) f32 and cache (n, P, d): float32, bfloat16 bits (uint16)
    rounded to nearest, or int8 codes with each row's scale in scales (n, P) (q8)."""
    if cache.dtype == np.float32:
        cache[:, pos0: pos0 + x.shape[0]] = x.transpose(1, 0, 2)
    elif cache.dtype == np.int8:
        if scales is None or scales.shape != cache.shape[:2]:
            raise ValueError("cache_rows: an int8 cache needs its rows' scales, shaped [heads, positions]")
        _cache_q8(x, cache, scales, pos0)
    else:
        _cache_bf16(x, cache, pos0)


@njit(**FLAGS)
def _cache_bf16(x, cache, pos0):
    T, n, d = x.shape
    for h in range(n):
        for t in range(T):
            row = cache[h, pos0 + t]
            for i in range(d):
                row[i] = f32_to_bf16(x[t, h, i])


@njit(**FLAGS)
def _cache_q8(x, cache, scales, pos0):
    """A row's codes round x / s to nearest for s = max |x| / 127, so the largest is +-127 (0 for a row of zeros)."""
    T, n, d = x.shape
    for h in range(n):
        for t in range(T):
            row = cache[h, pos0 + t]
            top = np.float32(0.0)
            for i in range(d):
                top = max(top, abs(x[t, h, i]))
            s = top / np.float32(127.0)
            scales[h, pos0 + t] = s
            inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
            for i in range(d):
                row[i] = np.int8(min(max(np.rint(x[t, h, i] * inv), -127.0), 127.0))


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


@njit(**PARALLEL)
def per_head(x, w, out):
    """out[t, h] = w[h] @ x[t, h] for x (T, nh, d), w (nh, n, d), out (T, nh, n): each head its own matrix
    (latent attention's absorbed kv_b); a row's sums run in one fixed order, whatever T is."""
    T, nh, d = x.shape
    n = w.shape[1]
    if w.shape != (nh, n, d) or out.shape != (T, nh, n):
        raise ValueError("per_head: w must be [heads, n, d] and out [tokens, heads, n] for x [tokens, heads, d]")
    for item in prange(T * nh):
        t = item // nh
        h = item % nh
        xh = np.empty(d, np.float32)  # x[t, h], contiguous (x may be a strided view)
        for i in range(d):
            xh[i] = x[t, h, i]
        for j in range(n):
            out[t, h, j] = dot1(w[h, j], xh)
