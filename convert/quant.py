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
way).

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
from ..runtime.kernels.bits import BF16_BITS, FLOAT, bf16_to_f32, f32_bits, weight_to_f32
from ..runtime.layout import CHUNK, SUPER, Packed, padded_cols, supers_of

# candidate codes for the group's largest value, per bit width, as their inverses (d = m / t)
_Q4_GRID = np.array([-9.0, -8.5, -8.0, -7.75, -7.5, -7.25, -7.0, -6.75, -6.5, -6.25, -6.0, -5.5, -5.0, 6.0, 6.5, 7.0, 7.5])
LANES = 24  # candidates evaluated side by side (_candidate_errs), at least the most of any width
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
def _group_err(x, g0, gs, d, inv, qmin, qmax):
    """Squared error of the group at scale d = 1 / inv (branch-free, so it vectorizes)."""
    inv = np.float32(inv)
    d32 = np.float32(d)
    err = np.float32(0.0)
    for c0 in range(g0, g0 + gs, CHUNK):
        for c in range(c0, c0 + CHUNK):  # a constant trip count: LLVM vectorizes it whole
            q = min(max(np.rint(x[c] * inv), np.float32(qmin)), np.float32(qmax))
            e = q * d32 - x[c]
            err += e * e
    return err


@njit(**EXACT)
def _on_grid(d, step):
    """d as a multiple k * step of its super-scale's step, |k| <= 127 (step 0, the first pass: d as it is)."""
    if step == 0.0:
        return d
    return min(max(np.rint(d / step), -127.0), 127.0) * step


@njit(**EXACT)
def _candidate_errs(x, g0, gs, ds, invs, qmin, qmax, errs):
    """errs[c]: squared error of the group at scale ds[c] = 1 / invs[c], for every candidate at once. Each is
    summed in _group_err's order (column by column), with the candidates side by side in vector lanes: a
    running sum cannot vectorize over columns without fast-math, but across candidates it needs no reordering."""
    for c in range(LANES):
        errs[c] = 0.0
    for i in range(g0, g0 + gs):
        xi = x[i]
        for c in range(LANES):  # a constant trip count: whole vectors, no remainder loop
            q = min(max(np.rint(xi * invs[c]), np.float32(qmin)), np.float32(qmax))
            e = q * ds[c] - xi
            errs[c] += e * e


@njit(**EXACT)
def _best_scale(x, g0, gs, qmin, qmax, inv_cands, step, grid, ds, invs, errs):
    """The scale of least squared error among the candidates and a least-squares refit, each on the grid
    (grid f64, ds, invs, errs f32: scratch of LANES)."""
    lo = x[g0]
    hi = x[g0]
    for c0 in range(g0, g0 + gs, CHUNK):
        for c in range(c0, c0 + CHUNK):
            lo = min(lo, x[c])
            hi = max(hi, x[c])
    m = lo if -lo > hi else hi  # the value of largest magnitude
    n = inv_cands.shape[0]
    for k in range(LANES):
        d = _on_grid(m * inv_cands[min(k, n - 1)], step)  # lanes past the candidates repeat the last one
        grid[k] = d
        ds[k] = np.float32(d)
        invs[k] = np.float32(1.0 / d) if d != 0.0 else np.float32(0.0)
    _candidate_errs(x, g0, gs, ds, invs, qmin, qmax, errs)
    best_d = 0.0
    best = np.inf
    for k in range(n):
        if grid[k] != 0.0 and errs[k] < best:
            best, best_d = errs[k], grid[k]
    if best_d == 0.0:
        return 0.0
    sxq = np.float32(0.0)
    sqq = np.float32(0.0)
    inv = np.float32(1.0 / best_d)
    for c0 in range(g0, g0 + gs, CHUNK):
        for c in range(c0, c0 + CHUNK):
            q = min(max(np.rint(x[c] * inv), np.float32(qmin)), np.float32(qmax))
            sxq += q * x[c]
            sqq += q * q
    d = _on_grid(sxq / sqq, step)
    if d != 0.0 and _group_err(x, g0, gs, d, 1.0 / d, qmin, qmax) < best:
        best_d = d
    return best_d


@njit(**EXACT)
def _bf16_round(x):
    """The bfloat16 nearest to x (finite, >= 0; ties to even), as its 16-bit pattern."""
    b = np.uint32(f32_bits(np.float32(x)))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**EXACT)
def _quantize_row(x, gs, bits, inv_cands, codes, scales, supers, stats):
    """x f32 [cols_pad] -> one uint8 code per column (q8: two's complement; else q + 2**(bits-1)), int8 scales
    [groups] and bfloat16 super-scales [supers].

    Two passes: each group's best scale, searched freely, sets its super-block's D (the largest
    magnitude among them); then each group searches again among the multiples k * D / 127 it can store."""
    qmax = (1 << (bits - 1)) - 1
    qmin = -qmax - 1
    cp = x.shape[0]
    groups = cp // gs
    free = np.empty(groups, np.float64)
    grid = np.empty(LANES, np.float64)
    ds, invs, errs = np.empty(LANES, np.float32), np.empty(LANES, np.float32), np.empty(LANES, np.float32)
    for g in range(groups):
        free[g] = _best_scale(x, g * gs, gs, qmin, qmax, inv_cands, 0.0, grid, ds, invs, errs)
    q = np.empty(cp, np.int32)
    emax = 0.0
    e2 = 0.0
    x2 = 0.0
    step = np.float32(0.0)
    for g in range(groups):
        if g % SUPER == 0:
            top = 0.0
            for h in range(g, min(g + SUPER, groups)):
                top = max(top, abs(free[h]))
            supers[g // SUPER] = _bf16_round(top)
            step = bf16_to_f32(supers[g // SUPER]) * np.float32(1.0 / 127.0)
        g0 = g * gs
        k = 0.0
        if step > 0:
            k = np.rint(_best_scale(x, g0, gs, qmin, qmax, inv_cands, np.float64(step), grid, ds, invs, errs) / step)
        scales[g] = np.int8(k)
        d32 = np.float32(k) * step  # the scale the kernels will use
        inv = np.float32(1.0 / d32) if d32 != 0.0 else np.float32(0.0)
        ge2 = np.float32(0.0)
        gx2 = np.float32(0.0)
        gmax = np.float32(0.0)
        for c0 in range(g0, g0 + gs, CHUNK):
            for c in range(c0, c0 + CHUNK):
                qc = min(max(np.rint(x[c] * inv), np.float32(qmin)), np.float32(qmax))
                q[c] = np.int32(qc)
                e = qc * d32 - x[c]
                gmax = max(gmax, abs(e))
                ge2 += e * e
                gx2 += x[c] * x[c]
        emax = max(emax, gmax)
        e2 += ge2
        x2 += gx2
    stats[0] = emax
    stats[1] = e2
    stats[2] = x2
    for c in range(cp):  # q8: two's complement; q4-q6: q + 2**(bits-1), packed by codec.pack_codes
        codes[c] = np.uint8((q[c] & 0xFF) if bits == 8 else q[c] - qmin)


@njit(parallel=True, **EXACT)
def _quantize(w, kind, gs, bits, inv_cands, codes, scales, supers, stats):
    """Each row of w (floats, or 16-bit patterns of `kind`: see bits.weight_to_f32) widened, padded and quantized."""
    rows, cols = w.shape
    cp = scales.shape[1] * gs
    for r in prange(rows):
        x = np.zeros(cp, np.float32)
        for c in range(cols):
            x[c] = weight_to_f32(w[r, c], kind)
        _quantize_row(x, gs, bits, inv_cands, codes[r], scales[r], supers[r], stats[r])


def quantize(w: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[Packed, QuantError]:
    """Quantize a 2-D tensor given as its raw values (dtype BF16: uint16 words; F16; F32) to q4, q5, q6 or q8."""
    if bits not in _CANDIDATES or group_size <= 0 or group_size % CHUNK:
        raise ValueError(f"bits {bits} / group size {group_size}")
    rows, cols = w.shape
    cp = padded_cols(cols, group_size)
    codes = np.empty((rows, cp), np.uint8)
    scales = np.empty((rows, cp // group_size), np.int8)
    supers = np.empty((rows, supers_of(cp // group_size)), np.uint16)
    stats = np.zeros((rows, 3), np.float64)
    if dtype == "BF16":
        _quantize(np.ascontiguousarray(w), BF16_BITS, group_size, bits, _CANDIDATES[bits], codes, scales, supers, stats)
    else:
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        _quantize(w32, FLOAT, group_size, bits, _CANDIDATES[bits], codes, scales, supers, stats)
    packed = Packed(f"q{bits}", (rows, cols), codes.view(np.int8) if bits == 8 else pack_codes(codes, bits), scales,
                    group_size, supers)
    err = QuantError(float(stats[:, 0].max(initial=0.0)), float(stats[:, 1].sum()), float(stats[:, 2].sum()))
    return packed, err
