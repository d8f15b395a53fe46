"""Group-wise symmetric quantization into the layout's q4 / q5 / q6 / q8 encodings, reporting its own error.

Each group of `group_size` columns of a row gets one scale d and each value a code q in
-2**(b-1) .. 2**(b-1) - 1 (value q * d); q4-q6 store q + 2**(b-1), q8 q itself. The scale is
searched, not just max-abs: the group's largest value m is mapped to each of a grid of candidate
codes (q4: -9 to -5 and 6 to 7.5, where those beyond the code range clip the largest values to
trade their error for a finer step everywhere else; q5 and q6 the same grid scaled by 2 and 4;
q8: -128 and 127), then a least-squares refit d = sum(q x) / sum(q q) of the best is tried, and
the scale of least squared error wins: the clipping grid beat max-abs candidates in perplexity on all four
trained models (tests/bench/README.md: the quantizer).

The quantizer compiles without fast-math (kernels.EXACT), so that the same source gives the same bytes whether
numba compiled it afresh or took its cached copy (with fast-math a near-tie between two scales could go either
way). Its sums therefore keep their order, each group's column by column; what vectorizes is the groups of a row,
side by side in vector lanes (the candidates' errors: simd.scale_errors, ERR_LANES groups per call, their sums in
registers).

Scales are stored in two levels (see layout): d = k * D / 127 with an int8 k per group and a
bfloat16 D per layout.SUPER groups. A first pass finds each group's best scale freely; D is the
largest of its groups' (rounded to bfloat16), and a second pass searches each group's scale again
among the multiples of D / 127, so the codes are chosen for the scale actually stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..runtime.codec import pack_codes
from ..runtime.kernels import EXACT
from ..runtime.kernels.bits import BF16_BITS, FLOAT, bf16_to_f32, f32_to_bf16, weight_to_f32
from ..runtime.kernels.simd import ERR_LANES, scale_errors
from ..runtime.layout import CHUNK, SUPER, Packed, padded_cols, supers_of

# candidate codes for the group's largest value, per bit width, as their inverses (d = m / t)
_Q4_GRID = np.array([-9.0, -8.5, -8.0, -7.75, -7.5, -7.25, -7.0, -6.75, -6.5, -6.25, -6.0, -5.5, -5.0, 6.0, 6.5, 7.0, 7.5])
_CANDIDATES = {4: 1.0 / _Q4_GRID, 5: 1.0 / (2 * _Q4_GRID), 6: 1.0 / (4 * _Q4_GRID), 8: 1.0 / np.array([-128.0, 127.0])}


@dataclass
class QuantError:
    """Error of one quantized tensor (or a sum of several): worst element and relative RMS."""

    max_abs: float = 0.0
    sum_err2: float = 0.0
    sum_x2: float = 0.0

    @property
    def rel_rms(self) -> float:
        return math.sqrt(self.sum_err2 / self.sum_x2) if self.sum_x2 > 0 else 0.0

    def add(self, other: QuantError) -> None:
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sum_err2 += other.sum_err2
        self.sum_x2 += other.sum_x2


@njit(**EXACT)
def _on_grid(d, step):
    """d as a multiple k * step of its super-scale's step, |k| <= 127 (step 0, the first pass: d as it is)."""
    if step == 0.0:
        return d
    return min(max(np.rint(d / step), -127.0), 127.0) * step


@njit(**EXACT)
def _errs(xt, d, qmin, qmax, d32, inv, err):
    """err[g]: squared error of group g (column g of xt, groups padded to ERR_LANES) at scale d[g] (float64; d32, inv:
    its float32 value and inverse, 0 where d is 0), each summed down its column in order (simd.scale_errors)."""
    for g in range(d.shape[0]):
        d32[g] = np.float32(d[g])
        inv[g] = np.float32(1.0 / d[g]) if d[g] != 0.0 else np.float32(0.0)
    for g0 in range(0, xt.shape[1], ERR_LANES):
        scale_errors(xt, d32, inv, err, g0, np.float32(qmin), np.float32(qmax))


@njit(**EXACT)
def _workspace(gs, groups):
    """Every buffer a row's quantization uses, allocated once for a block of rows: xt [gs, groups padded to
    ERR_LANES] (the row, a group a column; the padding stays zero), f32 and f64 rows of that width, qt [gs, groups]
    (the codes chosen)."""
    padded = -(-groups // ERR_LANES) * ERR_LANES
    return (np.zeros((gs, padded), np.float32), np.zeros((_F32_ROWS, padded), np.float32),
            np.zeros((_F64_ROWS, padded), np.float64), np.empty((gs, groups), np.int32))


_F32_ROWS = 14  # _best_scales' 8, then _quantize_row's 6
_F64_ROWS = 5  # _best_scales' 2, then _quantize_row's 3


@njit(**EXACT)
def _best_scales(xt, groups, qmin, qmax, inv_cands, step, best_d, f32w, f64w):
    """best_d[g]: the scale of least squared error for group g < groups (column g of xt) among the candidates and a
    least-squares refit, each on its grid (step[g]; 0: none). f32w, f64w: _workspace's rows, its first 8 and 2."""
    gs = xt.shape[0]
    lo, hi, m, d32, inv, err, sxq, sqq = f32w[0], f32w[1], f32w[2], f32w[3], f32w[4], f32w[5], f32w[6], f32w[7]
    best, d = f64w[0], f64w[1]  # d beyond groups stays 0
    for g in range(groups):
        lo[g] = xt[0, g]
        hi[g] = xt[0, g]
    for i in range(gs):
        for g in range(groups):
            lo[g] = min(lo[g], xt[i, g])
            hi[g] = max(hi[g], xt[i, g])
    for g in range(groups):
        m[g] = lo[g] if -lo[g] > hi[g] else hi[g]  # the value of largest magnitude
        best[g] = np.inf
        best_d[g] = 0.0
    for rt in inv_cands:
        for g in range(groups):
            d[g] = _on_grid(m[g] * rt, step[g])
        _errs(xt, d, qmin, qmax, d32, inv, err)
        for g in range(groups):
            if d[g] != 0.0 and err[g] < best[g]:
                best[g], best_d[g] = err[g], d[g]
    for g in range(groups):
        inv[g] = np.float32(1.0 / best_d[g]) if best_d[g] != 0.0 else np.float32(0.0)
        sxq[g] = 0.0
        sqq[g] = 0.0
    for i in range(gs):
        for g in range(groups):
            q = min(max(np.rint(xt[i, g] * inv[g]), np.float32(qmin)), np.float32(qmax))
            sxq[g] += q * xt[i, g]
            sqq[g] += q * q
    for g in range(groups):
        d[g] = _on_grid(sxq[g] / sqq[g], step[g]) if best_d[g] != 0.0 else 0.0
    _errs(xt, d, qmin, qmax, d32, inv, err)
    for g in range(groups):
        if d[g] != 0.0 and err[g] < best[g]:
            best_d[g] = d[g]


@njit(**EXACT)
def _quantize_row(xt, groups, bits, inv_cands, codes, scales, supers, stats, f32w, f64w, qt):
    """A row, given as xt [gs, groups] (see _workspace), -> codes (q4: the layout's nibbles; q5, q6:
    q + 2**(bits-1) a column; q8: q in two's complement), int8 scales [groups] and bfloat16 super-scales [supers].

    Two passes: each group's best scale, searched freely, sets its super-block's D (the largest
    magnitude among them); then each group searches again among the multiples k * D / 127 it can store.
    Every loop runs over the groups side by side."""
    gs = xt.shape[0]
    qmax = (1 << (bits - 1)) - 1
    qmin = -qmax - 1
    step, free, fitted = f64w[2], f64w[3], f64w[4]
    step32, d32, inv, ge2, gx2, gmax = f32w[8], f32w[9], f32w[10], f32w[11], f32w[12], f32w[13]
    step[:] = 0.0
    _best_scales(xt, groups, qmin, qmax, inv_cands, step, free, f32w, f64w)
    for g in range(groups):
        if g % SUPER == 0:
            top = 0.0
            for h in range(g, min(g + SUPER, groups)):
                top = max(top, abs(free[h]))
            supers[g // SUPER] = f32_to_bf16(top)
        step32[g] = bf16_to_f32(supers[g // SUPER]) * np.float32(1.0 / 127.0)
        step[g] = step32[g]
    _best_scales(xt, groups, qmin, qmax, inv_cands, step, fitted, f32w, f64w)
    for g in range(groups):
        k = np.rint(fitted[g] / step32[g]) if step32[g] > 0 else 0.0
        scales[g] = np.int8(k)
        d32[g] = np.float32(k) * step32[g]  # the scale the kernels will use
        inv[g] = np.float32(1.0 / d32[g]) if d32[g] != 0.0 else np.float32(0.0)
        ge2[g] = 0.0
        gx2[g] = 0.0
        gmax[g] = 0.0
    for i in range(gs):
        for g in range(groups):
            qc = min(max(np.rint(xt[i, g] * inv[g]), np.float32(qmin)), np.float32(qmax))
            qt[i, g] = np.int32(qc)
            e = qc * d32[g] - xt[i, g]
            gmax[g] = max(gmax[g], abs(e))
            ge2[g] += e * e
            gx2[g] += xt[i, g] * xt[i, g]
    emax = 0.0
    e2 = 0.0
    x2 = 0.0
    for g in range(groups):
        emax = max(emax, gmax[g])
        e2 += ge2[g]
        x2 += gx2[g]
    stats[0] = emax
    stats[1] = e2
    stats[2] = x2
    if bits == 4:  # q + 8 as the layout's nibbles (codec.pack_q4): a chunk's columns j and j + 16 in its byte j
        half = CHUNK // 2
        for g in range(groups):  # a chunk lies within one group (gs is a multiple of CHUNK)
            for c0 in range(0, gs, CHUNK):
                at = (g * gs + c0) // 2
                for j in range(half):
                    codes[at + j] = np.uint8((qt[c0 + j, g] - qmin) | ((qt[c0 + half + j, g] - qmin) << 4))
        return
    for g in range(groups):  # q8: two's complement; q5, q6: q + 2**(bits-1), packed by codec.pack_codes
        for i in range(gs):
            codes[g * gs + i] = np.uint8((qt[i, g] & 0xFF) if bits == 8 else qt[i, g] - qmin)


ROW_BLOCKS = 64  # a tensor's rows go to the threads in this many blocks, each with one _workspace


@njit(parallel=True, **EXACT)
def _quantize(w, kind, gs, bits, inv_cands, codes, scales, supers, stats):
    """Each row of w (floats, or 16-bit patterns of `kind`: see bits.weight_to_f32) widened, padded and quantized."""
    rows, cols = w.shape
    groups = scales.shape[1]
    blocks = min(rows, ROW_BLOCKS)
    for b in prange(blocks):
        xt, f32w, f64w, qt = _workspace(gs, groups)
        for r in range(b * rows // blocks, (b + 1) * rows // blocks):
            for g in range(groups):  # a last, partial group's padding is never written: zero
                for i in range(min(gs, cols - g * gs)):
                    xt[i, g] = weight_to_f32(w[r, g * gs + i], kind)
            _quantize_row(xt, groups, bits, inv_cands, codes[r], scales[r], supers[r], stats[r], f32w, f64w, qt)


def quantize(w: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[Packed, QuantError]:
    """Quantize a 2-D tensor given as its raw values (dtype BF16: uint16 words; F16; F32) to q4, q5, q6 or q8."""
    if bits not in _CANDIDATES or group_size <= 0 or group_size % CHUNK:
        raise ValueError(f"bits {bits} / group size {group_size}")
    rows, cols = w.shape
    cp = padded_cols(cols, group_size)
    codes = np.empty((rows, cp // 2 if bits == 4 else cp), np.uint8)
    scales = np.empty((rows, cp // group_size), np.int8)
    supers = np.empty((rows, supers_of(cp // group_size)), np.uint16)
    stats = np.zeros((rows, 3), np.float64)
    if dtype == "BF16":
        _quantize(np.ascontiguousarray(w), BF16_BITS, group_size, bits, _CANDIDATES[bits], codes, scales, supers, stats)
    else:
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        _quantize(w32, FLOAT, group_size, bits, _CANDIDATES[bits], codes, scales, supers, stats)
    stored = codes if bits == 4 else codes.view(np.int8) if bits == 8 else pack_codes(codes, bits)
    packed = Packed(f"q{bits}", (rows, cols), stored, scales, group_size, supers)
    err = QuantError(float(stats[:, 0].max(initial=0.0)), float(stats[:, 1].sum()), float(stats[:, 2].sum()))
    return packed, err
