"""Vector dot products of quantized weight rows with 8-bit activations, as LLVM IR in numba intrinsics.

Numba's auto-vectorizer finds neither the u8 x s8 multiply-adds nor a way to keep vector
accumulators across 32-column blocks, so the loop over one weight row is written here as LLVM IR:
x86 instructions on AVX2 CPUs, portable vector IR elsewhere (target_has_x86_simd).
Each intrinsic takes one row of codes and scales and a tile of NT tokens, walks the row's blocks
eight at a time (256 columns), and returns the NT dot products over those blocks; the caller adds
the blocks left over.

Per 32-column block b of a row (scale w_b = k * D / 127, _row_scales) and a token (int8 xq, scale x_b):
  q4: sum (n - 8) * xq = sum n * xq - 8 * sum xq: nibbles as u8 times xq as s8, and the second
      term from `xsum` = x_b * sum xq (once per call), added as w_b * (-8 * xsum_b).
  q5, q6: the same with the high bits or-ed into the nibbles, less 16 or 32 * sum xq.
  q8: sum c * xq = u8 x s8 of |c| and sign(xq, c) (AVX2); with VNNI, (c + 128) as u8 times xq,
      less 128 * sum xq like q4.
Blocks are taken in pairs, whose int32 partial sums share one vector (block 2k in the low half).
The u8 x s8 products are vpmaddubsw + vpmaddwd (AVX2) or vpdpbusd (AVX-512 VNNI / AVX-VNNI, used
when the target has it). Horizontal adds fold the int32 partial sums of eight blocks into one vector
holding a whole block per lane (two pairs folded at a time, to keep few vectors live), converted
once to float, x_b times it less the offset term, times w_b into one vector accumulator per
(row, token); the accumulator is reduced once per row.

Activations come arranged (see qmatmul._arrange_block): for each pair of blocks (c0, c1), 64 bytes
[c0[0:16], c1[0:16], c0[16:32], c1[16:32]], so one 32-byte load of q4 nibbles (c0's 16 bytes, then
c1's), masked and shifted, meets the activations of its low and of its high nibbles; q8 weights are
gathered in the same order (two 16-byte loads per vector).

What is emitted depends only on the CPU numba compiles for (part of numba's cache key), never on
run-time state, so cached kernels are always the right ones.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

from ..layout import SUPER

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
V8F32 = ir.VectorType(F32, 8)
BLOCKS = 8  # blocks of 32 columns per loop step
STEP = 1.0 / 127.0  # a group's scale is its int8 times super-scale * STEP (as float32: layout.group_scales)
BITS = {"q4": 4, "q5": 5, "q6": 6, "q8": 8}
OFFSETS = {"q4": 8, "q5": 16, "q6": 32}  # q4-q6 store q + 2**(bits - 1)
PREFETCH_BYTES = 2048  # how far ahead of the row position the loop prefetches codes (the next rows' when near the end)
_X86_NEEDS = ("avx2", "fma", "f16c")


def target_features() -> set[str]:
    """The CPU features numba compiles for: NUMBA_CPU_FEATURES when set, else the host's (as numba does)."""
    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def has_vnni(features: set[str]) -> bool:
    return {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features


def target_has_x86_simd() -> bool:
    """Whether numba compiles for an x86-64 CPU with AVX2, FMA and F16C: then the x86 instructions are
    used, else portable LLVM vector IR (NEON on arm64, SSE2 on an old x86), which LLVM lowers itself.

    To try the portable path on an AVX2 machine, compile for another CPU, e.g. NUMBA_CPU_NAME=x86-64
    NUMBA_CPU_FEATURES="" (numba keys its cache on the target, so nothing stale is reused).
    """
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and set(_X86_NEEDS) <= target_features()


def _splat(vty: ir.VectorType, value) -> ir.Constant:
    return ir.Constant(vty, [ir.Constant(vty.element, value)] * vty.count)


def _call(builder, name: str, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _load(builder, base, offset, ty):
    """An unaligned load of `ty` at byte `offset` from the i8* `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [offset], inbounds=True), ty.as_pointer()), align=1)


def _bytes(context, builder, aryty, value):
    """(i8* data, byte stride of dimension 0) of an array whose last dimension is contiguous."""
    ary = context.make_array(aryty)(context, builder, value)
    strides = cgutils.unpack_tuple(builder, ary.strides, aryty.ndim)
    return builder.bitcast(ary.data, I8.as_pointer()), strides[0]


def _hsum(builder, v):
    """Horizontal sum of a <8 x float>, halving: 4 + 4, 2 + 2, 1 + 1."""
    for width in (4, 2, 1):
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width, 2 * width))))
        v = builder.fadd(lo, hi, flags=("reassoc", "nsz", "contract"))
    return builder.extract_element(v, ir.Constant(I32, 0))


def _fma(builder, a, b, c):
    return _call(builder, "llvm.fmuladd.v8f32", V8F32, a, b, c)


def _row_scales(builder, srow, urow, b, shift):
    """<8 x float> weight scales of blocks b .. b+7: group g = (b + k) >> shift has scale k_g * (D / 127), k_g
    the int8 at srow[g] and D the bfloat16 at urow[g // SUPER], the same for the whole step (layout.SUPER
    groups span at least one step of BLOCKS blocks).

    Group size 32 (shift 0) loads 8 scales at once; larger groups gather them one by one (the branch
    is loop-invariant: LLVM unswitches the loop).
    """
    v8i8 = ir.VectorType(I8, 8)
    with builder.if_else(builder.icmp_unsigned("==", shift, ir.Constant(I64, 0))) as (uniform, grouped):
        with uniform:
            whole = _load(builder, srow, b, v8i8)
            whole_block = builder.block
        with grouped:
            gathered = ir.Constant(v8i8, None)
            for k in range(BLOCKS):
                g = builder.lshr(builder.add(b, ir.Constant(I64, k)), shift)
                gathered = builder.insert_element(gathered, _load(builder, srow, g, I8), ir.Constant(I32, k))
            gathered_block = builder.block
    ks = builder.phi(v8i8)
    ks.add_incoming(whole, whole_block)
    ks.add_incoming(gathered, gathered_block)
    sup = builder.lshr(builder.lshr(b, shift), ir.Constant(I64, SUPER.bit_length() - 1))
    d = _load(builder, urow, builder.mul(sup, ir.Constant(I64, 2)), I16)
    d = builder.bitcast(builder.shl(builder.zext(d, I32), ir.Constant(I32, 16)), F32)
    step = builder.fmul(d, ir.Constant(F32, STEP))
    steps = builder.shuffle_vector(builder.insert_element(ir.Constant(V8F32, None), step, ir.Constant(I32, 0)),
                                   ir.Constant(V8F32, None), ir.Constant(V8I32, [0] * 8))
    return builder.fmul(builder.sitofp(builder.sext(ks, V8I32), V8F32), steps)


def _dot_u8s8(builder, vnni: bool, pairs, wide: bool):
    """<8 x i32>: each lane the sum of 4 adjacent products u8 * s8 over all (u, s) pairs of <32 x i8>.

    vpmaddubsw saturates its int16 sums of two products: safe for one pair of any operands and, when
    not `wide`, for the sum of two pairs with u <= 15 (q4's nibbles); `wide` widens each to int32 first.
    """
    if vnni:
        acc = _splat(V8I32, 0)
        for u, s in pairs:
            acc = _call(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, acc,
                        builder.bitcast(u, V8I32), builder.bitcast(s, V8I32))
        return acc
    ones = _splat(V16I16, 1)
    products = [_call(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, u, s) for u, s in pairs]
    if wide:
        sums = [_call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, p, ones) for p in products]
        return builder.add(sums[0], sums[1])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, builder.add(products[0], products[1]), ones)


def _block_sums_portable(builder, pairs, signed: bool):
    """Portable IR: <2 x i32>, the sums of the products over the low and the high 16 lanes of the
    (weights, activations) <32 x i8> pairs; weights are zero-extended (q4 nibbles) or sign-extended.
    Each lane's two products fit int16 (|15 * 127| or |128 * 127|, twice)."""
    v32i16 = ir.VectorType(I16, 32)
    total = None
    for w, x in pairs:
        wide = builder.sext(w, v32i16) if signed else builder.zext(w, v32i16)
        p = builder.mul(wide, builder.sext(x, v32i16))
        total = p if total is None else builder.add(total, p)
    sums = []
    for half in (range(16), range(16, 32)):
        part = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(I32, 16), list(half)))
        sums.append(_call(builder, "llvm.vector.reduce.add.v16i32", I32, builder.sext(part, ir.VectorType(I32, 16))))
    return sums


def _phadd(builder, a, b):
    return _call(builder, "llvm.x86.avx2.phadd.d", V8I32, a, b)


def _per_block(builder, halves: list):
    """The two folded halves of 4 pairs' partial sums -> <8 x i32>, lane k the whole sum of block k. One more
    horizontal add ([0 2 4 6 | 1 3 5 7]) and a permute restore the order: in place of 4 conversions, FMAs and
    scale shuffles."""
    folded = _phadd(builder, halves[0], halves[1])
    return builder.shuffle_vector(folded, folded, ir.Constant(V8I32, [0, 4, 1, 5, 2, 6, 3, 7]))


def _concat16(builder, base, first, second):
    """<32 x i8> of the 16 bytes at `first` then the 16 at `second` (offsets from the i8* base)."""
    v16 = ir.VectorType(I8, 16)
    a = _load(builder, base, first, v16)
    b = _load(builder, base, second, v16)
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 32), list(range(32))))


def _high_bits(builder, kind: str, step_words, k: int):
    """q5 / q6: the high bits of pair k of a step, out of the step's (8 blocks') high bits loaded at once
    (once per step and row), as two <32 x i8> already shifted to bit 4, in the lanes of the pair's low and high
    nibbles (c0[0:16] c1[0:16], c0[16:32] c1[16:32])."""
    if kind == "q6":  # 8 bytes per block; byte k: columns k, k+8, k+16, k+24, two bits each
        v4i64 = ir.VectorType(I64, 4)
        words = builder.shuffle_vector(step_words, step_words, ir.Constant(ir.VectorType(I32, 4), [2 * k, 2 * k, 2 * k + 1, 2 * k + 1]))
        # one variable shift per 64 bits (vpsllvq, vpsrlvq) moves each lane's two bits to bits 4-5
        low = builder.shl(words, ir.Constant(v4i64, [ir.Constant(I64, n) for n in (4, 2, 4, 2)]))
        high = builder.lshr(words, ir.Constant(v4i64, [ir.Constant(I64, n) for n in (0, 2, 0, 2)]))
        return [builder.and_(builder.bitcast(v, V32I8), _splat(V32I8, 0x30)) for v in (low, high)]
    # q5: 4 bytes per block (layout.q5_bit): one variable shift per 32 bits brings each lane's bit to bit 4
    words = builder.shuffle_vector(step_words, step_words, ir.Constant(V8I32, [2 * k] * 4 + [2 * k + 1] * 4))
    low = builder.lshr(words, ir.Constant(V8I32, [0, 1, 2, 3] * 2))  # columns 0..15: bits 8b + 4 + a
    high = builder.shl(words, ir.Constant(V8I32, [4, 3, 2, 1] * 2))  # columns 16..31: bits 8b + a
    return [builder.and_(builder.bitcast(v, V32I8), _splat(V32I8, 0x10)) for v in (low, high)]


def _make_dot(kind: str, nr: int, nt: int):
    """An intrinsic (codes, scales, supers, r, xqa, xs, xsum, t0, nb, shift) -> nr * nt float32 dot products:
    rows r .. r+nr-1 (outer) with tokens t0 .. t0+nt-1 (inner).

    codes: u8 [rows, cols_pad * bits / 8] (q4, q5, q6: layout's nibbles, then high bits) or i8 [rows, cols_pad]
    (q8), scales i8 [rows, groups], supers u16 (bfloat16) [rows, ceil(groups / SUPER)];
    xqa int8 [T, cols_pad] arranged by pairs of blocks, xs and xsum f32 [T, cols_pad / 32]; blocks
    [0, nb), nb a multiple of 8; block b's scale is scales[r, g] * supers[r, g // SUPER] / 127, g = b >> shift.
    Each pair of blocks becomes two <32 x i8> weight vectors matching xqa's halves: for q4 one load
    of nibbles, masked (low) and shifted (high), q5 and q6 or-ing in their high bits (_high_bits);
    for q8 the blocks' first halves, then their second.
    Weights are unpacked once for the nt tokens, activations loaded once for the nr rows.
    Without AVX2 (see target_has_x86_simd) the products are portable vector IR, reduced per block.
    Arrays are taken whole, with the row index, as slicing them per row costs reference counting.
    """

    def codegen(context, builder, sig, args):
        x86 = target_has_x86_simd()
        codes_t, scales_t, supers_t, _, xq_t, xs_t, xsum_t = sig.args[:7]
        codes, codes_stride = _bytes(context, builder, codes_t, args[0])
        scales, scales_stride = _bytes(context, builder, scales_t, args[1])
        supers, supers_stride = _bytes(context, builder, supers_t, args[2])
        xq, xq_stride = _bytes(context, builder, xq_t, args[4])
        xs, xs_stride = _bytes(context, builder, xs_t, args[5])
        xsum, xsum_stride = _bytes(context, builder, xsum_t, args[6])
        r0, t0, nb, shift = args[3], args[7], args[8], args[9]

        def rows_of(base, stride, first, n):
            return [builder.gep(base, [builder.mul(builder.add(first, ir.Constant(I64, i)), stride)], inbounds=True)
                    for i in range(n)]

        crows, srows = rows_of(codes, codes_stride, r0, nr), rows_of(scales, scales_stride, r0, nr)
        urows = rows_of(supers, supers_stride, r0, nr)
        xq_rows, xs_rows = rows_of(xq, xq_stride, t0, nt), rows_of(xs, xs_stride, t0, nt)
        xsum_rows = rows_of(xsum, xsum_stride, t0, nt)
        tiles = [(i, j) for i in range(nr) for j in range(nt)]
        # per (row, token): one accumulator of scaled block sums, the offset term taken out block by block (a
        # second accumulator per tile would leave the 1 x 4 loop too few of AVX2's 16 vector registers)
        accs = {tile: cgutils.alloca_once_value(builder, _splat(V8F32, 0.0)) for tile in tiles}
        vnni = x86 and has_vnni(target_features())
        # the weights' offset, times sum(xq) per block: q4-q6 store q + 2**(bits-1); q8 with VNNI uses c + 128 as u8
        packed = kind != "q8"
        offset = float(OFFSETS[kind]) if packed else 128.0 if vnni else 0.0
        steps = builder.udiv(nb, ir.Constant(I64, BLOCKS))
        step_bytes = BLOCKS * (16 if packed else 32)  # bytes of one row's nibbles (or q8 codes) per loop step
        # q5 / q6: where a row's high bits begin (after cols_pad / 2 bytes of nibbles), and their bytes per block
        high_at = builder.udiv(builder.mul(codes_stride, ir.Constant(I64, 4)), ir.Constant(I64, BITS[kind]))
        high_block = {"q5": 4, "q6": 8}.get(kind, 0)
        prefetch_at = ir.Constant(I64, PREFETCH_BYTES)
        with cgutils.for_range(builder, steps) as loop:
            b = builder.mul(loop.index, ir.Constant(I64, BLOCKS))
            ints = {tile: [] for tile in tiles}  # per pair of blocks: <8 x i32> partial sums (x86) or 2 sums
            # the hardware prefetcher alone leaves a thread at 15 GB/s from RAM; PREFETCH_BYTES ahead, 20
            for crow in crows:
                ahead = builder.gep(crow, [builder.add(builder.mul(b, ir.Constant(I64, step_bytes // BLOCKS)), prefetch_at)])
                lines = [builder.gep(ahead, [ir.Constant(I64, line)]) for line in range(0, step_bytes, 64)]
                if high_block:  # the high bits' stream, as far ahead in columns (at most one line per step)
                    lines.append(builder.gep(crow, [builder.add(high_at, builder.mul(
                        builder.add(b, ir.Constant(I64, PREFETCH_BYTES // 16)), ir.Constant(I64, high_block)))]))
                for at in lines:
                    _call(builder, "llvm.prefetch.p0", ir.VoidType(), at,
                          ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1))
            # q5 / q6: the step's high bits (4 or 8 bytes per block), in one load per row
            step_words = [_load(builder, crow, builder.add(high_at, builder.mul(b, ir.Constant(I64, high_block))),
                                ir.VectorType(I32 if kind == "q5" else I64, 8))
                          if high_block else None for crow in crows]
            for k in range(BLOCKS // 2):
                pair = builder.add(b, ir.Constant(I64, 2 * k))
                xoff = builder.mul(pair, ir.Constant(I64, 32))  # 64 bytes of arranged activations per pair
                xv = [(_load(builder, row, xoff, V32I8), _load(builder, row, builder.add(xoff, ir.Constant(I64, 32)), V32I8))
                      for row in xq_rows]
                for i, crow in enumerate(crows):
                    if packed:
                        nib = _load(builder, crow, builder.mul(pair, ir.Constant(I64, 16)), V32I8)
                        lo = builder.and_(nib, _splat(V32I8, 0x0F))
                        hi = builder.and_(builder.lshr(nib, _splat(V32I8, 4)), _splat(V32I8, 0x0F))
                        if high_block:
                            hlo, hhi = _high_bits(builder, kind, step_words[i], k)
                            lo, hi = builder.or_(lo, hlo), builder.or_(hi, hhi)
                    else:
                        lo = _concat16(builder, crow, xoff, builder.add(xoff, ir.Constant(I64, 32)))
                        hi = _concat16(builder, crow, builder.add(xoff, ir.Constant(I64, 16)),
                                       builder.add(xoff, ir.Constant(I64, 48)))
                        if vnni:
                            lo = builder.xor(lo, _splat(V32I8, 0x80))
                            hi = builder.xor(hi, _splat(V32I8, 0x80))
                    for j, (xlo, xhi) in enumerate(xv):
                        if not x86:
                            ints[i, j].extend(_block_sums_portable(builder, [(lo, xlo), (hi, xhi)], kind == "q8"))
                            continue
                        if kind == "q8" and not vnni:  # |c| * sign(xq, c)
                            pairs = [(_abs8(builder, w), _call(builder, "llvm.x86.avx2.psign.b", V32I8, x, w))
                                     for w, x in ((lo, xlo), (hi, xhi))]
                        else:
                            pairs = [(lo, xlo), (hi, xhi)]
                        ints[i, j].append(_dot_u8s8(builder, vnni, pairs, wide=kind == "q8"))
                        if k % 2:  # fold two pairs' sums at once: a tile holds at most two live vectors, not four
                            ints[i, j][-2:] = [_phadd(builder, *ints[i, j][-2:])]
            xs_off = builder.mul(b, ir.Constant(I64, 4))
            xs8 = [_load(builder, row, xs_off, V8F32) for row in xs_rows]
            # -offset * xsum per block: what the weights' stored offset added to each block's sum, times x_b
            xoff8 = [builder.fmul(_load(builder, row, xs_off, V8F32), _splat(V8F32, -offset)) for row in xsum_rows
                     ] if offset else None
            for i, (srow, urow) in enumerate(zip(srows, urows, strict=True)):
                ws = _row_scales(builder, srow, urow, b, shift)
                for j in range(nt):
                    if x86:
                        isum = _per_block(builder, ints[i, j])
                    else:
                        isum = ir.Constant(V8I32, None)
                        for k, v in enumerate(ints[i, j]):
                            isum = builder.insert_element(isum, v, ir.Constant(I32, k))
                    blocks = builder.sitofp(isum, V8F32)
                    blocks = _fma(builder, blocks, xs8[j], xoff8[j]) if offset else builder.fmul(blocks, xs8[j])
                    builder.store(_fma(builder, ws, blocks, builder.load(accs[i, j])), accs[i, j])
        sums = [_hsum(builder, builder.load(accs[tile])) for tile in tiles]
        return context.make_tuple(builder, sig.return_type, sums)

    def typer(typingctx, codes, scales, supers, r, xqa, xs, xsum, t0, nb, shift):
        arrays = (codes, scales, supers, xqa, xs, xsum)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return None
        i64 = types.int64
        sig = types.UniTuple(types.float32, nr * nt)(codes, scales, supers, i64, xqa, xs, xsum, i64, i64, i64)
        return sig, codegen

    typer.__name__ = f"{kind}_dot{nr}x{nt}"
    return intrinsic(typer)


@intrinsic
def quantize_block(typingctx, x, xq, xqa, xs, xsum, t, b, odd_last):
    """Quantize block b (32 whole columns) of token t: xq[t] natural, xqa[t] in the pair layout (as
    itself when `odd_last`: the last block, without a partner), xs[t, b] = max|x| / 127,
    xsum[t, b] = xs * sum(xq). Exactly qmatmul.quantize_acts's arithmetic (no fast-math), in vectors.
    """
    arrays = (x, xq, xqa, xs, xsum)
    if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
        return None
    if x.dtype != types.float32 or xq.dtype != types.int8 or xs.dtype != types.float32:
        return None
    sig = types.void(x, xq, xqa, xs, xsum, types.int64, types.int64, types.boolean)

    def codegen(context, builder, sig, args):
        v32f, v32i32 = ir.VectorType(F32, 32), ir.VectorType(I32, 32)
        rows = [_bytes(context, builder, ty, v) for ty, v in zip(sig.args[:5], args[:5], strict=True)]
        t, b, odd_last = args[5], args[6], args[7]
        xrow, qrow, arow, srow, sumrow = (builder.gep(base, [builder.mul(t, stride)], inbounds=True)
                                          for base, stride in rows)
        xv = _load(builder, xrow, builder.mul(b, ir.Constant(I64, 128)), v32f)
        bits = builder.and_(builder.bitcast(xv, v32i32), _splat(v32i32, 0x7FFFFFFF))
        amax = builder.bitcast(_call(builder, "llvm.vector.reduce.umax.v32i32", I32, bits), F32)
        scale = builder.fdiv(amax, ir.Constant(F32, 127.0))
        div = builder.select(builder.fcmp_ordered(">", amax, ir.Constant(F32, 0.0)), scale, ir.Constant(F32, 1.0))
        divv = builder.insert_element(ir.Constant(v32f, None), div, ir.Constant(I32, 0))
        divv = builder.shuffle_vector(divv, divv, ir.Constant(v32i32, [0] * 32))
        q = builder.fptosi(_call(builder, "llvm.rint.v32f32", v32f, builder.fdiv(xv, divv)), V32I8)
        qsum = _call(builder, "llvm.vector.reduce.add.v32i32", I32, builder.sext(q, v32i32))
        off4 = builder.mul(b, ir.Constant(I64, 4))
        builder.store(scale, builder.bitcast(builder.gep(srow, [off4], inbounds=True), F32.as_pointer()))
        builder.store(builder.fmul(builder.sitofp(qsum, F32), scale),
                      builder.bitcast(builder.gep(sumrow, [off4], inbounds=True), F32.as_pointer()))
        off = builder.mul(b, ir.Constant(I64, 32))
        _store(builder, qrow, off, q)
        # pair layout: block 2p + h -> [p*64 + h*16 : +16] its first half, [p*64 + 32 + h*16 : +16] its second
        h16 = builder.mul(builder.and_(b, ir.Constant(I64, 1)), ir.Constant(I64, 16))
        first = builder.add(builder.mul(builder.lshr(b, ir.Constant(I64, 1)), ir.Constant(I64, 64)), h16)
        first = builder.select(odd_last, off, first)
        second = builder.add(first, builder.select(odd_last, ir.Constant(I64, 16), ir.Constant(I64, 32)))
        for at, lanes in ((first, range(16)), (second, range(16, 32))):
            _store(builder, arow, at, builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, 16), list(lanes))))
        return context.get_dummy_value()

    return sig, codegen


def _store(builder, base, offset, value):
    builder.store(value, builder.bitcast(builder.gep(base, [offset], inbounds=True), value.type.as_pointer()), align=1)


def _abs8(builder, v):
    return _call(builder, "llvm.abs.v32i8", V32I8, v, ir.Constant(ir.IntType(1), 0))


# (rows, tokens) tiles: 1 x 4 for prefill, 1 x 1 for decode (rows one after another: one stream from memory)
q4_dot1x4, q4_dot1x1 = (_make_dot("q4", 1, nt) for nt in (4, 1))
q5_dot1x4, q5_dot1x1 = (_make_dot("q5", 1, nt) for nt in (4, 1))
q6_dot1x4, q6_dot1x1 = (_make_dot("q6", 1, nt) for nt in (4, 1))
q8_dot1x4, q8_dot1x1 = (_make_dot("q8", 1, nt) for nt in (4, 1))
