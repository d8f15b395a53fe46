"""Matrix products of stored weights with float32 activations: out[t, r] = sum_c W[r, c] * x[t, c].

Weights are [rows, cols] in the layout's encodings (see moe.runtime.layout); x is f32 [T, cols],
out f32 [T, rows]. Quantized weights meet 8-bit activations (`quantize_acts`: one f32 scale per
32 columns) in integer dot products, one per 32-column block, scaled and summed in float32.

Every kernel runs its rows in parallel and, for T > 1, loops over the tokens inside each row, so
a weight row is read from memory once per call. Each output element is summed by one thread in a
fixed order: results are bit-identical whatever the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..layout import CHUNK, Packed
from . import PARALLEL
from .bits import bf16_to_f32, f16_to_f32

_QMAX = np.float32(127.0)


@njit(cache=True, nogil=True)  # exact division, no fast-math: x / scale, as the twin computes it
def quantize_acts(x, xq, xs):
    """x f32 [T, cols] -> xq int8 [T, cols_pad], xs f32 [T, cols_pad / 32]: x ~ xq * xs per 32 columns.

    scale = max|x| / 127 and xq = round(x / scale) (half to even); padding columns are zero.
    """
    T, cols = x.shape
    nblocks = xq.shape[1] // CHUNK
    for t in range(T):
        xrow = x[t]
        qrow = xq[t]
        for b in range(nblocks):
            lo = b * CHUNK
            hi = min(lo + CHUNK, cols)
            amax = np.float32(0.0)
            for c in range(lo, hi):
                amax = max(amax, abs(xrow[c]))
            scale = amax / _QMAX
            xs[t, b] = scale
            for c in range(lo, lo + CHUNK):
                qrow[c] = np.int8(np.rint(xrow[c] / scale)) if c < hi and amax > 0 else np.int8(0)


@njit(**PARALLEL)
def matmul_q4(codes, scales, gs, xq, xs, out):
    """codes u8 [rows, cols_pad / 2] (nibbles), scales u16 [rows, cols_pad / gs] (f16 bits)."""
    rows = codes.shape[0]
    T = xq.shape[0]
    ngroups = scales.shape[1]
    per_group = gs // CHUNK
    for r in prange(rows):
        crow = codes[r]
        srow = scales[r]
        for t in range(T):
            qrow = xq[t]
            xsrow = xs[t]
            acc = np.float32(0.0)
            for g in range(ngroups):
                gacc = np.float32(0.0)
                for b in range(g * per_group, (g + 1) * per_group):
                    isum = np.int32(0)
                    for i in range(CHUNK // 2):
                        v = np.int32(crow[b * (CHUNK // 2) + i])
                        isum += ((v & 15) - 8) * np.int32(qrow[b * CHUNK + i])
                        isum += ((v >> 4) - 8) * np.int32(qrow[b * CHUNK + CHUNK // 2 + i])
                    gacc += np.float32(isum) * xsrow[b]
                acc += gacc * f16_to_f32(srow[g])
            out[t, r] = acc


@njit(**PARALLEL)
def matmul_q8(codes, scales, gs, xq, xs, out):
    """codes i8 [rows, cols_pad], scales u16 [rows, cols_pad / gs] (f16 bits)."""
    rows = codes.shape[0]
    T = xq.shape[0]
    ngroups = scales.shape[1]
    per_group = gs // CHUNK
    for r in prange(rows):
        crow = codes[r]
        srow = scales[r]
        for t in range(T):
            qrow = xq[t]
            xsrow = xs[t]
            acc = np.float32(0.0)
            for g in range(ngroups):
                gacc = np.float32(0.0)
                for b in range(g * per_group, (g + 1) * per_group):
                    isum = np.int32(0)
                    for i in range(b * CHUNK, (b + 1) * CHUNK):
                        isum += np.int32(crow[i]) * np.int32(qrow[i])
                    gacc += np.float32(isum) * xsrow[b]
                acc += gacc * f16_to_f32(srow[g])
            out[t, r] = acc


@njit(**PARALLEL)
def matmul_f32(w, x, out):
    """w f32 [rows, cols]."""
    rows, cols = w.shape
    T = x.shape[0]
    for r in prange(rows):
        wrow = w[r]
        for t in range(T):
            xrow = x[t]
            acc = np.float32(0.0)
            for c in range(cols):
                acc += wrow[c] * xrow[c]
            out[t, r] = acc


@njit(**PARALLEL)
def matmul_bf16(w, x, out):
    """w u16 [rows, cols] (bfloat16 bits)."""
    rows, cols = w.shape
    T = x.shape[0]
    for r in prange(rows):
        wrow = w[r]
        for t in range(T):
            xrow = x[t]
            acc = np.float32(0.0)
            for c in range(cols):
                acc += bf16_to_f32(wrow[c]) * xrow[c]
            out[t, r] = acc


@njit(**PARALLEL)
def matmul_f16(w, x, out):
    """w u16 [rows, cols] (float16 bits)."""
    rows, cols = w.shape
    T = x.shape[0]
    for r in prange(rows):
        wrow = w[r]
        for t in range(T):
            xrow = x[t]
            acc = np.float32(0.0)
            for c in range(cols):
                acc += f16_to_f32(wrow[c]) * xrow[c]
            out[t, r] = acc


class Scratch:
    """Reusable buffers for the 8-bit activations, grown on demand, so repeated calls allocate nothing."""

    def __init__(self, max_tokens: int = 1, max_cols: int = 0):
        self._xq = np.zeros(0, np.int8)
        self._xs = np.zeros(0, np.float32)
        self.reserve(max_tokens, max_cols)

    def reserve(self, tokens: int, cols: int) -> None:
        cols_pad = -(-cols // CHUNK) * CHUNK
        if tokens * cols_pad > self._xq.size:
            self._xq = np.zeros(tokens * cols_pad, np.int8)
            self._xs = np.zeros(tokens * cols_pad // CHUNK, np.float32)

    def acts(self, tokens: int, cols_pad: int) -> tuple[np.ndarray, np.ndarray]:
        """Views xq int8 [tokens, cols_pad] and xs f32 [tokens, cols_pad / 32] into the buffers."""
        self.reserve(tokens, cols_pad)
        xq = self._xq[: tokens * cols_pad].reshape(tokens, cols_pad)
        xs = self._xs[: tokens * cols_pad // CHUNK].reshape(tokens, cols_pad // CHUNK)
        return xq, xs


def linear(p: Packed, x: np.ndarray, out: np.ndarray, scratch: Scratch) -> np.ndarray:
    """out f32 [T, rows] = x f32 [T, cols] @ W.T for a packed weight W [rows, cols] in any encoding."""
    enc = p.encoding
    if enc == "q4" or enc == "q8":
        cols_pad = p.codes.shape[1] * (2 if enc == "q4" else 1)
        xq, xs = scratch.acts(x.shape[0], cols_pad)
        quantize_acts(x, xq, xs)
        kernel = matmul_q4 if enc == "q4" else matmul_q8
        kernel(p.codes, p.scales.view(np.uint16), p.group_size, xq, xs, out)
    elif enc == "f32":
        matmul_f32(p.codes, x, out)
    elif enc == "bf16":
        matmul_bf16(p.codes, x, out)
    elif enc == "f16":
        matmul_f16(p.codes.view(np.uint16), x, out)
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    return out
