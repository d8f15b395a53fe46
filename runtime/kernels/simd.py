"""Vector dot products of quantized weight rows with 8-bit activations, as LLVM IR in numba intrinsics.

Numba's auto-vectorizer finds neither the u8 x s8 multiply-adds nor a way to keep vector
accumulators across 32-column blocks, so the loop over one weight row is written here as LLVM IR:
x86 instructions on AVX2 CPUs, sdot on arm64 CPUs that have it, portable vector IR elsewhere (target_isa).
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

arm64 (dotprod): the same integer block sums, from signed dot products of 4 bytes (sdot; signed products of
nibbles are exact), with the blocks' float combination unchanged: results are bit-identical to the portable
path's on the same CPU. Activations come in groups of 4 blocks of 4-byte units (UNIT, GROUP) and the weights
are read with interleaving loads (ld4), so that each 32-bit lane of an sdot sums one block: no horizontal adds.

Activations come arranged (see qmatmul.arranged_at; below, x86's): for each pair of blocks (c0, c1), 64 bytes
[c0[0:16], c1[0:16], c0[16:32], c1[16:32]], so one 32-byte load of q4 nibbles (c0's 16 bytes, then
c1's), masked and shifted, meets the activations of its low and of its high nibbles; q8 weights are
gathered in the same order (two 16-byte loads per vector).

What is emitted depends only on the CPU numba compiles for (part of numba's cache key), never on
run-time state, so cached kernels are always the right ones.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

from ..layout import CHUNK, SUPER

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
V4I32, V16I8 = ir.VectorType(I32, 4), ir.VectorType(I8, 16)
V8F32 = ir.VectorType(F32, 8)
BLOCKS = 8  # blocks of 32 columns per loop step
STEP = 1.0 / 127.0  # a group's scale is its int8 times super-scale * STEP (as float32: layout.group_scales)
BITS = {"q4": 4, "q5": 5, "q6": 6, "q8": 8}
OFFSETS = {"q4": 8, "q5": 16, "q6": 32}  # q4-q6 store q + 2**(bits - 1)
PREFETCH_BYTES = 2048  # how far ahead of the row position the loop prefetches codes (the next rows' when near the end)
_X86_NEEDS = ("avx2", "fma", "f16c")


def _numba_target() -> tuple[str, str]:
    """(cpu, features) numba compiles for: NUMBA_CPU_NAME and NUMBA_CPU_FEATURES when set, else the host's, as
    numba takes them (its features are "" where LLVM cannot read the host's, as on macOS: the cpu implies them)."""
    cpu = config.CPU_NAME or llvm.get_host_cpu_name()
    return cpu, config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()


def target_features() -> set[str]:
    """The CPU features numba compiles for that it names (none for a bare cpu name)."""
    return {f[1:] for f in _numba_target()[1].split(",") if f.startswith("+")}


def has_vnni(features: set[str]) -> bool:
    return {"avx512vnni", "avx512vl"} <= features or "avxvnni" in features


def target_isa() -> str:
    """How the dot products are emitted for the CPU numba compiles for: "vnni" or "avx2" (x86-64 with AVX2, FMA
    and F16C, and AVX-512 VNNI or AVX-VNNI), "dotprod" (arm64 with sdot), else "portable": vector IR that
    LLVM lowers itself (NEON without sdot, SSE2 on an old x86).

    To try another path, compile for another CPU, e.g. NUMBA_CPU_NAME=x86-64 NUMBA_CPU_FEATURES="" for the
    portable one on an AVX2 machine (numba keys its cache on the target, so nothing stale is reused).
    """
    arch = llvm.get_process_triple().split("-")[0]
    if arch in ("x86_64", "amd64"):
        features = target_features()
        if set(_X86_NEEDS) <= features:
            return "vnni" if has_vnni(features) else "avx2"
    elif arch in ("aarch64", "arm64") and _has_dotprod(llvm.get_process_triple(), *_numba_target()):
        return "dotprod"
    return "portable"


def target_has_x86_simd() -> bool:
    return target_isa() in ("avx2", "vnni")


_DOT_PROBE = """
define i32 @probe(<16 x i8> %a, <16 x i8> %b) {
  %x = sext <16 x i8> %a to <16 x i32>
  %y = sext <16 x i8> %b to <16 x i32>
  %m = mul <16 x i32> %x, %y
  %s = call i32 @llvm.vector.reduce.add.v16i32(<16 x i32> %m)
  ret i32 %s
}
declare i32 @llvm.vector.reduce.add.v16i32(<16 x i32>)
"""


@functools.cache
def _has_dotprod(triple: str, cpu: str, features: str) -> bool:
    """Whether LLVM compiles for this arm64 target with sdot, asked of LLVM itself: which CPUs have it is its
    knowledge, and on macOS numba names only the cpu. A lone sum of 16 signed byte products becomes one sdot
    exactly when the target has it (calling the intrinsic on a target without it would abort the process)."""
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features)
    return "sdot" in machine.emit_assembly(llvm.parse_assembly(_DOT_PROBE))


# How prepare_acts arranges a token's 8-bit activations for the kernels (xqa): in each group of GROUP blocks,
# column c of block m at ((c % 16 // UNIT * 2 + c // 16) * GROUP + m) * UNIT + c % UNIT (qmatmul.arranged_at).
# x86 and portable: pairs of blocks in 16-byte halves (one 32-byte load meets a pair's low or high nibbles);
# dotprod: groups of 4 blocks in 4-byte units, so that each 32-bit lane of sdot meets one block (_dotprod_sums).
UNIT, GROUP = (4, 4) if target_isa() == "dotprod" else (16, 2)


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


def _gathered(builder, sums):
    """<8 x i32> of the portable path's 8 block sums."""
    v = ir.Constant(V8I32, None)
    for k, x in enumerate(sums):
        v = builder.insert_element(v, x, ir.Constant(I32, k))
    return v


def _words(builder, base, at, n: int, picks):
    """<16 x i8> vectors of the words picked (lists of 4 indices) out of the n 32-bit words at byte `at`."""
    v = _load(builder, base, at, ir.VectorType(I32, n))
    return [builder.bitcast(builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), p)), V16I8) for p in picks]


def _group_weights(builder, kind: str, crow, first, high_at):
    """arm64: blocks first .. first+3 of a row as 8 <16 x i8>, in the order of the dotprod arrangement's
    units (w, h): lane m's 4 bytes are block m's columns 16h + 4w .. +3. q4-q6 take word w of each block's
    nibbles (one interleaved load: ld4), the low nibbles for h = 0, the high for h = 1, with their high
    bits: q5's word per block holds column 4w + e's in byte e at bit 4 + w (h = 0) or w (h = 1); q6's
    word w % 2 of 2 per block holds them in byte e at bits 2 (w // 2) (h = 0) or 4 + 2 (w // 2) (h = 1).
    q8 takes word 4h + w of each block's 8."""
    def at(base, per_block):
        return builder.add(base, builder.mul(first, ir.Constant(I64, per_block)))

    if kind == "q8":  # two blocks per ld4: word w and 4 + w of each, then the 4 blocks' words w and 4 + w apart
        halves = [_ld4(builder, crow, at(ir.Constant(I64, 64 * pair), 32)) for pair in range(2)]
        return [builder.bitcast(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 4), list(range(h, 8, 2)))),
                                V16I8) for a, b in zip(*halves, strict=True) for h in range(2)]
    raw = _words(builder, crow, at(ir.Constant(I64, 0), 16), 16, [[4 * m + w for m in range(4)] for w in range(4)])
    if kind == "q5":  # nibbles swapped, so that column 4w + e's bit sits at w (h = 0) and 4 + w (h = 1), as q6's do
        word = _words(builder, crow, at(high_at, 4), 4, [list(range(4))])[0]
        swapped = _call(builder, "llvm.aarch64.neon.vsli.v16i8", V16I8, builder.lshr(word, _splat(V16I8, 4)), word,
                        ir.Constant(I32, 4))
        high = [swapped] * 4
        shifts, mask = range(4), 1
    elif kind == "q6":
        high = _words(builder, crow, at(high_at, 8), 8, [[2 * m + p for m in range(4)] for p in range(2)]) * 2
        shifts, mask = (0, 0, 2, 2), 3
    units = []
    for w, r in enumerate(raw):
        if kind == "q4":
            units += [builder.and_(r, _splat(V16I8, 0x0F)), builder.lshr(r, _splat(V16I8, 4))]
            continue
        bits = builder.lshr(high[w], _splat(V16I8, shifts[w])) if shifts[w] else high[w]
        four = ir.Constant(I32, 4)  # shift-and-insert: the nibble and its high bits in one instruction each
        units += [_call(builder, "llvm.aarch64.neon.vsli.v16i8", V16I8, r, builder.and_(bits, _splat(V16I8, mask)), four),
                  _call(builder, "llvm.aarch64.neon.vsri.v16i8", V16I8, builder.and_(bits, _splat(V16I8, mask << 4)), r, four)]
    return units


def _ld4(builder, base, at):
    """<4 x i32> x 4 of the 64 bytes at `at`, word k of 16 in vector k % 4 (ld4)."""
    v4 = ir.VectorType(I32, 4)
    both = _call(builder, "llvm.aarch64.neon.ld4.v4i32.p0", ir.LiteralStructType([v4] * 4),
                 builder.gep(base, [at], inbounds=True))
    return [builder.extract_value(both, k) for k in range(4)]


def _dotprod_sums(builder, kind: str, crows, xq_rows, high_at, b):
    """arm64 with sdot: {(row, token): <8 x i32>}, the sums of blocks b .. b+7 (lane k block b + k).

    Per group of 4 blocks, 8 signed dot products of 4 bytes (sdot) of one weight unit and one activation
    unit (_group_weights, and the activations' arrangement GROUP x UNIT) sum each block in its own lane:
    no horizontal adds. Signed products are exact: q4-q6 codes with their high bits are 0..63, q8 codes
    and activations int8."""
    sums = {}
    for g in range(BLOCKS // 4):
        first = builder.add(b, ir.Constant(I64, 4 * g))
        xoff = builder.mul(first, ir.Constant(I64, 32))
        xunits = [[_load(builder, row, builder.add(xoff, ir.Constant(I64, 16 * u)), V16I8) for u in range(8)]
                  for row in xq_rows]
        for i, crow in enumerate(crows):
            units = _group_weights(builder, kind, crow, first, high_at)
            for j, xs in enumerate(xunits):
                acc = _splat(V4I32, 0)
                for w, x in zip(units, xs, strict=True):
                    acc = _call(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", V4I32, acc, w, x)
                sums.setdefault((i, j), []).append(acc)
    return {tile: builder.shuffle_vector(*v, ir.Constant(V8I32, list(range(8)))) for tile, v in sums.items()}


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
    The products are x86 instructions, sdot (arm64) or portable vector IR, reduced per block, as target_isa says.
    Arrays are taken whole, with the row index, as slicing them per row costs reference counting.
    """

    def codegen(context, builder, sig, args):
        return emit_dot(target_isa(), kind, nr, nt, context, builder, sig, args)

    def typer(typingctx, codes, scales, supers, r, xqa, xs, xsum, t0, nb, shift):
        arrays = (codes, scales, supers, xqa, xs, xsum)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return None
        i64 = types.int64
        sig = types.UniTuple(types.float32, nr * nt)(codes, scales, supers, i64, xqa, xs, xsum, i64, i64, i64)
        return sig, codegen

    typer.__name__ = f"{kind}_dot{nr}x{nt}"
    return intrinsic(typer)


def emit_dot(isa: str, kind: str, nr: int, nt: int, context, builder, sig, args):
    """The body of _make_dot's intrinsic as `isa` (target_isa's names) runs it; apart, so that the IR of
    another CPU's kernels can be looked at here (tests/test_arm64_asm.py)."""
    x86 = isa in ("avx2", "vnni")
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
    vnni = isa == "vnni"
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
        if isa == "dotprod":
            isums = _dotprod_sums(builder, kind, crows, xq_rows, high_at, b)
        else:
            ints = {tile: [] for tile in tiles}  # per pair of blocks: <8 x i32> partial sums (x86) or 2 sums
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
                        if isa == "portable":
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
            isums = {tile: _per_block(builder, v) if x86 else _gathered(builder, v) for tile, v in ints.items()}
        xs_off = builder.mul(b, ir.Constant(I64, 4))
        xs8 = [_load(builder, row, xs_off, V8F32) for row in xs_rows]
        # -offset * xsum per block: what the weights' stored offset added to each block's sum, times x_b
        xoff8 = [builder.fmul(_load(builder, row, xs_off, V8F32), _splat(V8F32, -offset)) for row in xsum_rows
                 ] if offset else None
        for i, (srow, urow) in enumerate(zip(srows, urows, strict=True)):
            ws = _row_scales(builder, srow, urow, b, shift)
            for j in range(nt):
                blocks = builder.sitofp(isums[i, j], V8F32)
                blocks = _fma(builder, blocks, xs8[j], xoff8[j]) if offset else builder.fmul(blocks, xs8[j])
                builder.store(_fma(builder, ws, blocks, builder.load(accs[i, j])), accs[i, j])
    sums = [_hsum(builder, builder.load(accs[tile])) for tile in tiles]
    return context.make_tuple(builder, sig.return_type, sums)


@intrinsic
def quantize_block(typingctx, x, xq, xqa, xs, xsum, t, b, as_is):
    """Quantize block b (32 whole columns) of token t: xq[t] natural, xqa[t] arranged (UNIT, GROUP; as
    itself when `as_is`: a block of a last, partial group), xs[t, b] = max|x| / 127,
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
        t, b, as_is = args[5], args[6], args[7]
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
        # unit (w, h) of the block, columns 16h + UNIT w .. +UNIT, at arranged_at's place (as it is when as_is)
        m = builder.urem(b, ir.Constant(I64, GROUP))
        group = builder.add(builder.mul(builder.sub(b, m), ir.Constant(I64, CHUNK)), builder.mul(m, ir.Constant(I64, UNIT)))
        for h in range(2):
            for w in range(16 // UNIT):
                lanes = range(16 * h + UNIT * w, 16 * h + UNIT * (w + 1))
                at = builder.select(as_is, builder.add(off, ir.Constant(I64, lanes[0])),
                                    builder.add(group, ir.Constant(I64, (w * 2 + h) * GROUP * UNIT)))
                _store(builder, arow, at, builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(I32, UNIT), list(lanes))))
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
