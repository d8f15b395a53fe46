"""Explicit x86 dot products of quantized weight rows with 8-bit activations, as LLVM IR in numba intrinsics.

Numba's auto-vectorizer finds neither the u8 x s8 multiply-adds nor a way to keep vector
accumulators across 32-column blocks, so the loop over one weight row is written here as LLVM IR.
Each intrinsic takes one row of codes and scales and a tile of NT tokens, walks the row's blocks
eight at a time (256 columns), and returns the NT dot products over those blocks; the caller adds
the blocks left over.

Per 32-column block b of a row (float16 scale w_b) and a token (int8 xq, scale x_b):
  q4: sum (n - 8) * xq = sum n * xq - 8 * sum xq: nibbles as u8 times xq as s8, and the second
      term from `xsum` = x_b * sum xq (once per call), added as w_b * (-8 * xsum_b).
  q8: sum c * xq = u8 x s8 of |c| and sign(xq, c) (AVX2); with VNNI, (c + 128) as u8 times xq,
      less 128 * sum xq like q4.
The u8 x s8 products are vpmaddubsw + vpmaddwd (AVX2) or vpdpbusd (AVX-512 VNNI / AVX-VNNI, used
when the target has it). Horizontal adds fold the int32 partial sums of eight blocks into one vector
holding a whole block per lane, converted once to float and multiplied by w_b * x_b into a vector
accumulator; the accumulator is reduced once per row.

q4 activations come arranged (see qmatmul.arrange_q4): for each pair of blocks (c0, c1), 64 bytes
[c0[0:16], c1[0:16], c0[16:32], c1[16:32]], so one 32-byte load of nibbles (c0's 16 bytes, then
c1's), masked and shifted, meets the activations of its low and of its high nibbles.

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

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32, HALF = ir.FloatType(), ir.HalfType()
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
V8I16, V8HALF, V8F32 = ir.VectorType(I16, 8), ir.VectorType(HALF, 8), ir.VectorType(F32, 8)
BLOCKS = 8  # blocks of 32 columns per loop step
_X86_NEEDS = ("avx2", "fma", "f16c")


def target_features() -> set[str]:
    """The CPU features numba compiles for: NUMBA_CPU_FEATURES when set, else the host's (as numba does)."""
    if config.CPU_FEATURES is not None:
        return {f[1:] for f in config.CPU_FEATURES.split(",") if f.startswith("+")}
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def has_vnni(features: set[str]) -> bool:
    return {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features


def target_has_simd() -> bool:
    """Whether numba compiles for an x86-64 CPU with AVX2, FMA and F16C (the SIMD kernels' needs).

    To run the generic kernels on such a machine, compile for another CPU, e.g. NUMBA_CPU_NAME=x86-64
    NUMBA_CPU_FEATURES=+64bit,+sse2 (numba keys its cache on the target, so nothing stale is reused).
    """
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return x86 and set(_X86_NEEDS) <= target_features()


@intrinsic
def available(typingctx):
    """In a kernel: a compile-time constant, target_has_simd() for the CPU being compiled for."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(target_has_simd()))

    return types.boolean(), codegen


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


def _lanes(builder, v, idx: list[int]):
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 8), idx))


def _row_scales(builder, srow, b, shift):
    """<8 x float> weight scales of blocks b .. b+7: scale index (b + k) >> shift.

    Group size 32 (shift 0) loads 8 scales at once; larger groups gather them one by one (the branch
    is loop-invariant: LLVM unswitches the loop).
    """
    with builder.if_else(builder.icmp_unsigned("==", shift, ir.Constant(I64, 0))) as (uniform, grouped):
        with uniform:
            whole = _load(builder, srow, builder.mul(b, ir.Constant(I64, 2)), V8I16)
            whole_block = builder.block
        with grouped:
            gathered = ir.Constant(V8I16, None)
            for k in range(BLOCKS):
                g = builder.lshr(builder.add(b, ir.Constant(I64, k)), shift)
                h = _load(builder, srow, builder.mul(g, ir.Constant(I64, 2)), I16)
                gathered = builder.insert_element(gathered, h, ir.Constant(I32, k))
            gathered_block = builder.block
    h = builder.phi(V8I16)
    h.add_incoming(whole, whole_block)
    h.add_incoming(gathered, gathered_block)
    return builder.fpext(builder.bitcast(h, V8HALF), V8F32)


def _dot_u8s8(builder, vnni: bool, pairs):
    """<8 x i32>: each lane the sum of 4 adjacent products u8 * s8 over all (u, s) pairs of <32 x i8>."""
    if vnni:
        acc = _splat(V8I32, 0)
        for u, s in pairs:
            acc = _call(builder, "llvm.x86.avx512.vpdpbusd.256", V8I32, acc,
                        builder.bitcast(u, V8I32), builder.bitcast(s, V8I32))
        return acc
    # |sum of two u8 * s8 products| <= 2 * 255 * 128 fits int16 for u <= 15 or |s| <= 127 with u <= 128
    p = None
    for u, s in pairs:
        q = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, u, s)
        p = q if p is None else builder.add(p, q)
    return _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, p, _splat(V16I16, 1))


def _phadd(builder, a, b):
    return _call(builder, "llvm.x86.avx2.phadd.d", V8I32, a, b)


def _per_block(builder, vs: list):
    """Partial sums -> <8 x i32> holding one whole block per lane, and the block each lane holds.

    q4 gives 4 vectors, one per pair of blocks (2k in the low 4 lanes, 2k+1 in the high 4);
    q8 gives 8, one per block. Horizontal adds fold them, in place of 8 conversions and FMAs.
    """
    if len(vs) == 4:
        return _phadd(builder, _phadd(builder, vs[0], vs[1]), _phadd(builder, vs[2], vs[3])), [0, 2, 4, 6, 1, 3, 5, 7]
    lo = _phadd(builder, _phadd(builder, vs[0], vs[1]), _phadd(builder, vs[2], vs[3]))  # [0 1 2 3 | 0 1 2 3]
    hi = _phadd(builder, _phadd(builder, vs[4], vs[5]), _phadd(builder, vs[6], vs[7]))  # [4 5 6 7 | 4 5 6 7]
    first = builder.shuffle_vector(lo, hi, ir.Constant(V8I32, [0, 1, 2, 3, 8, 9, 10, 11]))
    second = builder.shuffle_vector(lo, hi, ir.Constant(V8I32, [4, 5, 6, 7, 12, 13, 14, 15]))
    return builder.add(first, second), list(range(8))


def _make_dot(kind: str, nt: int):
    """An intrinsic (codes, scales, r, xq, xs, xsum, t0, nb, shift) -> nt float32 dot products of row r.

    codes: u8 nibbles [rows, cols_pad / 2] (q4) or i8 [rows, cols_pad] (q8), scales u16 [rows, groups];
    xq int8 [T, cols_pad] (arranged for q4), xs and xsum f32 [T, cols_pad / 32]; tokens t0 .. t0+nt-1;
    blocks [0, nb), nb a multiple of 8; block b's scale is scales[r, b >> shift]. On a target without
    the SIMD instructions it returns zeros (the callers then set nb = 0).
    Arrays are taken whole, with the row index, as slicing them per row costs reference counting.
    """

    def codegen(context, builder, sig, args):
        if not target_has_simd():
            return context.make_tuple(builder, sig.return_type, [ir.Constant(F32, 0.0)] * nt)
        codes_t, scales_t, _, xq_t, xs_t, xsum_t = sig.args[:6]
        codes, codes_stride = _bytes(context, builder, codes_t, args[0])
        scales, scales_stride = _bytes(context, builder, scales_t, args[1])
        r = args[2]
        crow = builder.gep(codes, [builder.mul(r, codes_stride)], inbounds=True)
        srow = builder.gep(scales, [builder.mul(r, scales_stride)], inbounds=True)
        xq, xq_stride = _bytes(context, builder, xq_t, args[3])
        xs, xs_stride = _bytes(context, builder, xs_t, args[4])
        xsum, xsum_stride = _bytes(context, builder, xsum_t, args[5])
        t0, nb, shift = args[6], args[7], args[8]
        xq_rows, xs_rows, xsum_rows = [], [], []
        for j in range(nt):
            t = builder.add(t0, ir.Constant(I64, j))
            xq_rows.append(builder.gep(xq, [builder.mul(t, xq_stride)], inbounds=True))
            xs_rows.append(builder.gep(xs, [builder.mul(t, xs_stride)], inbounds=True))
            xsum_rows.append(builder.gep(xsum, [builder.mul(t, xsum_stride)], inbounds=True))
        # two accumulators per token (block sums, offset terms) keep the FMA chains short
        accs = [cgutils.alloca_once_value(builder, _splat(V8F32, 0.0)) for _ in range(2 * nt)]
        vnni = has_vnni(target_features())
        low4 = _splat(V32I8, 0x0F)
        four = _splat(V32I8, 4)
        steps = builder.udiv(nb, ir.Constant(I64, BLOCKS))
        with cgutils.for_range(builder, steps) as loop:
            b = builder.mul(loop.index, ir.Constant(I64, BLOCKS))
            ints = [[] for _ in range(nt)]  # per token: <8 x i32> partial sums of the step's blocks
            if kind == "q4":
                for k in range(BLOCKS // 2):  # pairs of blocks: 32 bytes of nibbles
                    off = builder.mul(builder.add(b, ir.Constant(I64, 2 * k)), ir.Constant(I64, 16))
                    nib = _load(builder, crow, off, V32I8)
                    lo = builder.and_(nib, low4)
                    hi = builder.and_(builder.lshr(nib, four), low4)
                    xoff = builder.mul(off, ir.Constant(I64, 2))  # 64 bytes of arranged activations per pair
                    for j in range(nt):
                        xlo = _load(builder, xq_rows[j], xoff, V32I8)
                        xhi = _load(builder, xq_rows[j], builder.add(xoff, ir.Constant(I64, 32)), V32I8)
                        ints[j].append(_dot_u8s8(builder, vnni, [(lo, xlo), (hi, xhi)]))
            else:
                for k in range(BLOCKS):
                    off = builder.mul(builder.add(b, ir.Constant(I64, k)), ir.Constant(I64, 32))
                    w = _load(builder, crow, off, V32I8)
                    if vnni:  # c + 128 as u8; the 128 * sum(xq) it adds is taken off with xsum below
                        wu = builder.xor(w, _splat(V32I8, 0x80))
                    else:
                        wu = _call(builder, "llvm.abs.v32i8", V32I8, w, ir.Constant(ir.IntType(1), 0))
                    for j in range(nt):
                        x = _load(builder, xq_rows[j], off, V32I8)
                        if not vnni:
                            x = _call(builder, "llvm.x86.avx2.psign.b", V32I8, x, w)
                        ints[j].append(_dot_u8s8(builder, vnni, [(wu, x)]))
            ws = _row_scales(builder, srow, b, shift)
            xs_off = builder.mul(b, ir.Constant(I64, 4))
            offset = -8.0 if kind == "q4" else -128.0 if vnni else 0.0  # times sum(xq), per block
            for j in range(nt):
                if offset:
                    xsum8 = builder.fmul(_load(builder, xsum_rows[j], xs_off, V8F32), _splat(V8F32, offset))
                    builder.store(_fma(builder, ws, xsum8, builder.load(accs[nt + j])), accs[nt + j])
                isum, order = _per_block(builder, ints[j])
                d = _lanes(builder, builder.fmul(ws, _load(builder, xs_rows[j], xs_off, V8F32)), order)
                builder.store(_fma(builder, builder.sitofp(isum, V8F32), d, builder.load(accs[j])), accs[j])
        fast = ("reassoc", "nsz", "contract")
        sums = [_hsum(builder, builder.fadd(builder.load(accs[j]), builder.load(accs[nt + j]), flags=fast))
                for j in range(nt)]
        return context.make_tuple(builder, sig.return_type, sums)

    def typer(typingctx, codes, scales, r, xq, xs, xsum, t0, nb, shift):
        arrays = (codes, scales, xq, xs, xsum)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return None
        i64 = types.int64
        return types.UniTuple(types.float32, nt)(codes, scales, i64, xq, xs, xsum, i64, i64, i64), codegen

    typer.__name__ = f"{kind}_dot{nt}"
    return intrinsic(typer)


q4_dot1 = _make_dot("q4", 1)
q4_dot4 = _make_dot("q4", 4)
q8_dot1 = _make_dot("q8", 1)
q8_dot4 = _make_dot("q8", 4)
