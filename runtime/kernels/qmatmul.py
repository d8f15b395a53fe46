"""Matrix products of stored weights with float32 activations: out[t, r] = sum_c W[r, c] * x[t, c].

Weights are [rows, cols] in the layout's encodings (see moe.runtime.layout); x is f32 [T, cols],
out f32 [T, rows]. Quantized weights meet 8-bit activations (`quantize_acts`: one f32 scale per
32 columns) in integer dot products, one per 32-column block, scaled and summed in float32.

Every kernel runs its rows in parallel and, for T > 1, loops over the tokens inside each row, so
a weight row is read from memory once per call. Each output element is summed by one thread in a
fixed order: results are bit-identical whatever the thread count.

The quantized products' inner loops are LLVM IR (simd.py): AVX2 / AVX-512 VNNI instructions when
numba compiles for such an x86 CPU, sdot on arm64 CPUs with it, portable vector IR otherwise. Entry points: `linear` and
`linear_each` (Python, any encoding, with a reusable `Scratch`); the njit-callable `linear_quant`
(quantize and multiply in one call, q4 / q5 / q6 / q8 by `bits`), and the interface's
`quantize_acts`, `prepare_acts`, `matmul_quant`, `matmul_f32`, `matmul_bf16`, `matmul_f16`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import codec
from ..layout import CHUNK, QUANT_BITS, SUPER, Packed
from . import EXACT, FLAGS, PARALLEL, simd
from .bits import BF16_BITS, F16_BITS, FLOAT, bf16_to_f32, u32_as_f32, weight_to_f32

_QMAX = np.float32(127.0)
# Whatever quantizes activations compiles without fast-math (EXACT; inlined code takes its caller's
# floating-point attributes): x / scale must be the exact division the twin computes.


@njit(**EXACT)
def _quantize_blocks(x, xq, xs, t, b0, b1):
    """Blocks [b0, b1) of token t, as quantize_acts says. max |x| is taken over the bits of |x|: an
    integer max vectorizes, a float max with NaN semantics does not."""
    cols = x.shape[1]
    for b in range(b0, b1):
        lo = b * CHUNK
        xb = x[t, lo : min(lo + CHUNK, cols)]
        bits = xb.view(np.uint32)
        qb = xq[t, lo : lo + CHUNK]
        amax_bits = np.uint32(0)
        for i in range(xb.size):
            amax_bits = max(amax_bits, bits[i] & np.uint32(0x7FFFFFFF))
        amax = u32_as_f32(amax_bits)
        scale = amax / _QMAX
        xs[t, b] = scale
        div = scale if amax > 0 else np.float32(1.0)
        for i in range(xb.size):
            qb[i] = np.int8(np.rint(xb[i] / div))
        for i in range(xb.size, CHUNK):
            qb[i] = 0


@njit(**EXACT)
def quantize_acts(x, xq, xs):
    """x f32 [T, cols] -> xq int8 [T, cols_pad], xs f32 [T, cols_pad / 32]: x ~ xq * xs per 32 columns.

    scale = max|x| / 127 and xq = round(x / scale) (half to even); padding columns are zero.
    """
    for t in range(x.shape[0]):
        _quantize_blocks(x, xq, xs, t, 0, xq.shape[1] // CHUNK)


@njit(inline="always", **FLAGS)
def arranged_at(b, c, nblocks):
    """Where column c of block b goes in the arranged activations the vector kernels read (simd.UNIT, GROUP);
    the blocks of a last, partial group stay where they are."""
    m = b % simd.GROUP
    if b >= nblocks - nblocks % simd.GROUP:
        return b * CHUNK + c
    return (b - m) * CHUNK + ((c % 16 // simd.UNIT * 2 + c // 16) * simd.GROUP + m) * simd.UNIT + c % simd.UNIT


@njit(**FLAGS)
def _arrange_block(xq, xqa, t, b):
    """Block b of token t into xqa, arranged for the vector kernels (arranged_at)."""
    nblocks = xq.shape[1] // CHUNK
    for c in range(CHUNK):
        xqa[t, arranged_at(b, c, nblocks)] = xq[t, b * CHUNK + c]


@njit(**FLAGS)
def _sum_block(xq, xs, xsum, t, b):
    """xsum[t, b] = xs * (the sum of xq over block b): the vector kernels' offset term."""
    s = np.int32(0)
    for i in range(b * CHUNK, (b + 1) * CHUNK):
        s += np.int32(xq[t, i])
    xsum[t, b] = np.float32(s) * xs[t, b]


@njit(inline="always", **FLAGS)
def group_scale(srow, urow, g):
    """Group g's scale from one row's int8 scales and bfloat16 super-scales: k * (D / 127), as simd computes it."""
    return np.float32(srow[g]) * (bf16_to_f32(urow[g // SUPER]) * np.float32(simd.STEP))


q5_bit = njit(inline="always", **FLAGS)(codec.q5_bit)  # the layout's one formula, compiled for the kernels


@njit(**FLAGS)
def _packed_blocks(crow, srow, urow, per_group, qrow, xsrow, b0, b1, bits):
    """sum over blocks [b0, b1) of one q4 / q5 / q6 row (layout's order) with one token's 8-bit activations (all
    1-D). Byte i of a block's nibbles holds columns i and i + 16; q5's high bits are one uint32 per block (column j
    at bit q5_bit(j)), q6's byte i % 8 of 8 holds columns i and i + 16 at bits 2 (i // 8) and 4 + 2 (i // 8)."""
    half = CHUNK // 2
    offset = np.int32(1 << (bits - 1))
    high_at = crow.shape[0] * 4 // bits  # the high bits follow cols_pad / 2 bytes of nibbles
    acc = np.float32(0.0)
    for b in range(b0, b1):
        isum = np.int32(0)
        word = np.int32(0)
        if bits == 5:
            for k in range(4):
                word |= np.int32(crow[high_at + 4 * b + k]) << (8 * k)
        for i in range(half):
            v = np.int32(crow[b * half + i])
            lo = v & 15
            hi = v >> 4
            if bits == 5:
                lo |= ((word >> q5_bit(i)) & 1) << 4
                hi |= ((word >> q5_bit(i + half)) & 1) << 4
            elif bits == 6:
                h = np.int32(crow[high_at + 8 * b + i % 8]) >> (2 * (i // 8))
                lo |= (h & 3) << 4
                hi |= ((h >> 4) & 3) << 4
            isum += (lo - offset) * np.int32(qrow[b * CHUNK + i])
            isum += (hi - offset) * np.int32(qrow[b * CHUNK + half + i])
        acc += np.float32(isum) * (xsrow[b] * group_scale(srow, urow, b // per_group))
    return acc


@njit(**FLAGS)
def _q8_blocks(crow, srow, urow, per_group, qrow, xsrow, b0, b1):
    """sum over blocks [b0, b1) of one q8 row with one token's 8-bit activations (all 1-D)."""
    acc = np.float32(0.0)
    for b in range(b0, b1):
        isum = np.int32(0)
        for i in range(b * CHUNK, (b + 1) * CHUNK):
            isum += np.int32(crow[i]) * np.int32(qrow[i])
        acc += np.float32(isum) * (xsrow[b] * group_scale(srow, urow, b // per_group))
    return acc


@njit(**FLAGS)
def _vector_span(nblocks, per_group):
    """(blocks the vector row step covers, scale index shift): whole steps of 8 blocks when groups span a
    power of two of blocks; the scalar loop takes the rest."""
    shift = 0
    while (1 << shift) < per_group:
        shift += 1
    if (1 << shift) != per_group:
        return 0, 0
    return nblocks // simd.BLOCKS * simd.BLOCKS, shift


@njit(**FLAGS)
def _tail(codes, scales, supers, r, per_group, xq, xs, t, nb, bits):
    """Row r times token t over the blocks the vector step leaves, [nb, nblocks), through the scalar loop."""
    if bits == 8:
        return _q8_blocks(codes[r], scales[r], supers[r], per_group, xq[t], xs[t], nb, xs.shape[1])
    return _packed_blocks(codes[r], scales[r], supers[r], per_group, xq[t], xs[t], nb, xs.shape[1], bits)


@njit(inline="always", **FLAGS)  # inlined in numba's IR: a call per row costs a quarter of the decode speed
def _row_dot(codes, scales, supers, r, xq, xqa, xs, xsum, t, nb, shift, per_group, bits):
    """Row r times token t: the vector step over blocks [0, nb), then the scalar tail."""
    if bits == 4:
        a = simd.q4_dot1x1(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)[0]
    elif bits == 5:
        a = simd.q5_dot1x1(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)[0]
    elif bits == 6:
        a = simd.q6_dot1x1(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)[0]
    else:
        a = simd.q8_dot1x1(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)[0]
    if nb < xs.shape[1]:
        a += _tail(codes, scales, supers, r, per_group, xq, xs, t, nb, bits)
    return a


ROW_TILE = 8  # rows whose codes stay in L1 while a tile of 4 tokens runs over them (prefill)
INTERLEAVED = simd.target_has_x86_simd()  # prefill's q4-q6 tiles of simd.TILE_ROWS interleaved rows x 4 tokens


@njit(**FLAGS)
def _interleave(codes, scales, supers, r0, nb, shift, bits):
    """Rows r0 .. r0 + simd.TILE_ROWS of q4 / q5 / q6 weights, interleaved for simd.dot_tile."""
    units = np.empty(nb * CHUNK * simd.TILE_ROWS, np.uint8)
    ws = np.empty(nb * simd.TILE_ROWS, np.float32)
    if bits == 4:
        simd.q4_interleave(codes, scales, supers, r0, units, ws, nb, shift)
    elif bits == 5:
        simd.q5_interleave(codes, scales, supers, r0, units, ws, nb, shift)
    else:
        simd.q6_interleave(codes, scales, supers, r0, units, ws, nb, shift)
    return units, ws


@njit(**PARALLEL)
def _matmul_quant(codes, scales, supers, gs, xq, xqa, xs, xsum, out, bits):
    """q4, q5, q6 or q8 weights (`bits`) times prepared activations.

    Tiles of ROW_TILE rows in parallel; within one, tiles of 4 tokens run over its rows through the
    vector step (simd.py), then single tokens row after row: one sequential stream through memory, which
    reads twice as fast from RAM as 4 rows side by side (measured: 2048-column q4 rows on one thread, 20
    GB/s against 11); then the blocks it leaves (a tail of fewer than 8, or all of them for groups of a
    non-power-of-two number of blocks) go through the scalar loop. On x86, a whole tile of q4-q6 rows is
    interleaved once and its 4-token tiles go through simd.dot_tile instead: the same bits, no horizontal
    adds, each weight vector meeting 4 tokens; about twice the 1 x 4 tile's speed (tests/bench/README.md).
    """
    rows = codes.shape[0]
    T, cols_pad = xq.shape
    nblocks = xs.shape[1]
    # the vector step reads raw pointers: shapes that disagree must stop here, not read out of bounds
    if codes.shape[1] * 8 != cols_pad * bits or xqa.shape != xq.shape or xs.shape != (T, cols_pad // CHUNK):
        raise ValueError("matmul: codes, activations and their scales disagree in shape")
    groups = cols_pad // gs if gs > 0 else 0
    if gs <= 0 or gs % CHUNK or scales.shape != (rows, groups) or xsum.shape != xs.shape:
        raise ValueError("matmul: scales disagree with codes and group size")
    if supers.shape != (rows, -(-groups // SUPER)):
        raise ValueError("matmul: super-scales disagree with scales")
    if out.shape != (T, rows):
        raise ValueError("matmul: out must be [tokens, rows]")
    per_group = gs // CHUNK
    nb, shift = _vector_span(nblocks, per_group)
    interleave = INTERLEAVED and bits != 8 and nb > 0 and T >= 8  # fewer tokens: no faster than 1 x 4 (measured)
    offset = np.float32(1 << (bits - 1))
    tile_rows = simd.TILE_ROWS if interleave else ROW_TILE
    for tile in prange((rows + tile_rows - 1) // tile_rows):
        r0 = tile * tile_rows
        r1 = min(r0 + tile_rows, rows)
        tiled = T - T % 4  # tokens the 4-token tiles take
        if interleave and r1 - r0 == tile_rows:
            units, ws = _interleave(codes, scales, supers, r0, nb, shift, bits)
            for t in range(0, tiled, 4):
                simd.dot_tile(units, ws, xq, xs, xsum, out, t, r0, nb, offset)
        else:
            for t in range(0, tiled, 4):
                for r in range(r0, r1):
                    if bits == 4:
                        a = simd.q4_dot1x4(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)
                    elif bits == 5:
                        a = simd.q5_dot1x4(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)
                    elif bits == 6:
                        a = simd.q6_dot1x4(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)
                    else:
                        a = simd.q8_dot1x4(codes, scales, supers, r, xqa, xs, xsum, t, nb, shift)
                    for j in range(4):
                        out[t + j, r] = a[j]
        if nb < nblocks:
            for t in range(tiled):
                for r in range(r0, r1):
                    out[t, r] += _tail(codes, scales, supers, r, per_group, xq, xs, t, nb, bits)
        for t in range(tiled, T):
            for r in range(r0, r1):
                out[t, r] = _row_dot(codes, scales, supers, r, xq, xqa, xs, xsum, t, nb, shift, per_group, bits)


@njit(**PARALLEL)
def _matmul_quant_each(codes, scales, supers, gs, xq, xqa, xs, xsum, out, bits):
    """out[j] = W_j x_j for the k weights of the tuples codes and scales (one shape and group size) and the
    k rows of the prepared activations: one parallel region over every (weight, row tile), so the threads
    stream through all k weights without a barrier between them. Each row is summed as _matmul_quant sums
    it for a single token (_row_dot)."""
    k = len(codes)
    rows = codes[0].shape[0]
    cols_pad = xq.shape[1]
    nblocks = xs.shape[1]
    if xq.shape[0] != k or xqa.shape != xq.shape or xs.shape != (k, cols_pad // CHUNK) or xsum.shape != xs.shape:
        raise ValueError("matmul: one row of activations per weight")
    if gs <= 0 or gs % CHUNK or out.shape != (k, rows):
        raise ValueError("matmul: out must be [weights, rows]")
    for j in range(k):
        if codes[j].shape != (rows, cols_pad * bits // 8) or scales[j].shape != (rows, cols_pad // gs):
            raise ValueError("matmul: the weights disagree in shape")
        if supers[j].shape != (rows, -(-(cols_pad // gs) // SUPER)):
            raise ValueError("matmul: super-scales disagree with scales")
    per_group = gs // CHUNK
    nb, shift = _vector_span(nblocks, per_group)
    tiles = (rows + ROW_TILE - 1) // ROW_TILE
    for item in prange(k * tiles):
        j = item // tiles
        r0 = (item - j * tiles) * ROW_TILE
        cj, sj, uj = codes[j], scales[j], supers[j]
        for r in range(r0, min(r0 + ROW_TILE, rows)):
            out[j, r] = _row_dot(cj, sj, uj, r, xq, xqa, xs, xsum, j, nb, shift, per_group, bits)


@njit(**EXACT)
def _linear_each(codes, scales, supers, gs, x, xq, xqa, xs, xsum, out, bits):
    """One compiled call: out[j] = W_j x[j] for tuples of k quantized weights (`bits`) and x f32 [k, cols]."""
    prepare_acts(x, xq, xqa, xs, xsum)
    _matmul_quant_each(codes, scales, supers, gs, xq, xqa, xs, xsum, out, bits)


@njit(**FLAGS)
def _prepare(xq, xs, xqa, xsum):
    for t in range(xq.shape[0]):
        for b in range(xs.shape[1]):
            _arrange_block(xq, xqa, t, b)
            _sum_block(xq, xs, xsum, t, b)


@njit(**EXACT)
def prepare_acts(x, xq, xqa, xs, xsum):
    """quantize_acts, and what the vector kernels also read: xqa (_arrange_block) and xsum (_sum_block).

    Whole blocks in one vector pass each (simd.quantize_block); a last partial block and padding
    blocks through the scalar code.
    """
    T, cols = x.shape
    nblocks = xs.shape[1]
    if xq.shape[0] != T or cols > xq.shape[1] or xqa.shape != xq.shape:
        raise ValueError("prepare_acts: xq must be [tokens, cols_pad >= cols]")
    if xs.shape != (T, xq.shape[1] // CHUNK) or xsum.shape != xs.shape:
        raise ValueError("prepare_acts: xs and xsum must be [tokens, cols_pad / 32]")
    full = cols // CHUNK
    for t in range(T):
        for b in range(full):
            simd.quantize_block(x, xq, xqa, xs, xsum, t, b, b >= nblocks - nblocks % simd.GROUP)
        _quantize_blocks(x, xq, xs, t, full, nblocks)
        for b in range(full, nblocks):
            _arrange_block(xq, xqa, t, b)
            _sum_block(xq, xs, xsum, t, b)


@njit(**EXACT)
def matmul_quant(codes, scales, supers, gs, xq, xs, out, bits):
    """codes [rows, cols_pad * bits / 8] (layout's q4 / q5 / q6 / q8), scales i8 [rows, groups] and supers u16
    [rows, ceil(groups / SUPER)] (layout's two-level scales), xq and xs from quantize_acts. Allocates the vector
    kernel's small buffers; linear() reuses a Scratch."""
    xqa = np.empty_like(xq)
    xsum = np.empty_like(xs)
    _prepare(xq, xs, xqa, xsum)
    _matmul_quant(codes, scales, supers, gs, xq, xqa, xs, xsum, out, bits)


@njit(**EXACT)
def linear_quant(codes, scales, supers, gs, x, xq, xqa, xs, xsum, out, bits):
    """One compiled call: prepare_acts(x) into the given buffers, then the quantized product."""
    prepare_acts(x, xq, xqa, xs, xsum)
    _matmul_quant(codes, scales, supers, gs, xq, xqa, xs, xsum, out, bits)


@njit(**PARALLEL)
def _matmul_float(w, x, out, kind):
    """w [rows, cols] of kind `kind` (see bits.weight_to_f32) times x f32 [T, cols], C order. simd's float sums
    read float32 and bfloat16 rows as they are; a float16 row is widened first."""
    rows, cols = w.shape
    T = x.shape[0]
    if x.shape[1] != cols or out.shape != (T, rows):
        raise ValueError("matmul: x must be [tokens, cols] and out [tokens, rows] for w [rows, cols]")
    for r in prange(rows):
        if kind == F16_BITS:
            wide = np.empty(cols, np.float32)
            for c in range(cols):
                wide[c] = weight_to_f32(w[r, c], kind)
            simd.row_dots(wide, x, 0, x.shape[0], out[:, r])
        else:
            simd.row_dots(w[r], x, 0, x.shape[0], out[:, r])


@njit(**FLAGS)
def matmul_f32(w, x, out):
    """w f32 [rows, cols]."""
    _matmul_float(w, x, out, FLOAT)


@njit(**FLAGS)
def matmul_bf16(w, x, out):
    """w u16 [rows, cols] (bfloat16 bits)."""
    _matmul_float(w, x, out, BF16_BITS)


@njit(**FLAGS)
def matmul_f16(w, x, out):
    """w u16 [rows, cols] (float16 bits)."""
    _matmul_float(w, x, out, F16_BITS)


class Scratch:
    """Reusable activation buffers (xq, arranged xq, xs, block sums), grown on demand; the views for each
    (tokens, cols_pad) are kept, so a repeated call allocates nothing, not even a view."""

    def __init__(self, max_tokens: int = 1, max_cols: int = 0):
        self._size = 0
        self._views: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
        self.reserve(max_tokens, max_cols)

    def reserve(self, tokens: int, cols: int) -> None:
        n = tokens * (-(-cols // CHUNK) * CHUNK)
        if n > self._size:
            self._size = n
            self._buffers = (np.zeros(n, np.int8), np.zeros(n, np.int8),
                             np.zeros(n // CHUNK, np.float32), np.zeros(n // CHUNK, np.float32))
            self._views.clear()

    def acts(self, tokens: int, cols_pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Views xq, xqa int8 [tokens, cols_pad] and xs, xsum f32 [tokens, cols_pad / 32] into the buffers."""
        views = self._views.get((tokens, cols_pad))
        if views is None:
            self.reserve(tokens, cols_pad)
            n = tokens * cols_pad
            xq, xqa, xs, xsum = self._buffers
            shape = (tokens, cols_pad // CHUNK)
            views = (xq[:n].reshape(tokens, cols_pad), xqa[:n].reshape(tokens, cols_pad),
                     xs[: n // CHUNK].reshape(shape), xsum[: n // CHUNK].reshape(shape))
            self._views[(tokens, cols_pad)] = views
        return views


def linear(p: Packed, x: np.ndarray, out: np.ndarray, scratch: Scratch) -> np.ndarray:
    """out f32 [T, rows] = x f32 [T, cols] @ W.T for a packed weight W [rows, cols] in any encoding."""
    enc = p.encoding
    x = np.ascontiguousarray(x, dtype=np.float32)  # the vector kernels read whole rows; a no-op as a rule
    if enc in QUANT_BITS:
        bits = QUANT_BITS[enc]
        cols_pad = p.codes.shape[1] * 8 // bits
        linear_quant(p.codes, p.scales, p.supers, p.group_size, x, *scratch.acts(x.shape[0], cols_pad), out, bits)
    elif enc == "f32":
        matmul_f32(p.codes, x, out)
    elif enc == "bf16":
        matmul_bf16(p.codes, x, out)
    elif enc == "f16":
        matmul_f16(p.codes.view(np.uint16), x, out)
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    return out


def linear_each(weights: list[Packed], x: np.ndarray, out: np.ndarray, scratch: Scratch) -> np.ndarray:
    """out[j] = W_j x[j] for k weights of one shape and encoding (say, the experts a token chose): quantized,
    one compiled call and one parallel region; else linear() per weight. Results equal linear()'s."""
    enc = weights[0].encoding
    if enc not in QUANT_BITS or any(w.encoding != enc or w.group_size != weights[0].group_size for w in weights):
        for j, w in enumerate(weights):
            linear(w, x[j: j + 1], out[j: j + 1], scratch)
        return out
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = QUANT_BITS[enc]
    cols_pad = weights[0].codes.shape[1] * 8 // bits
    _linear_each(tuple(w.codes for w in weights), tuple(w.scales for w in weights), tuple(w.supers for w in weights),
                 weights[0].group_size, x, *scratch.acts(x.shape[0], cols_pad), out, bits)
    return out
