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
nibbles are exact), with the blocks' float combination the same up to powers of two (_accumulate_group): results
are bit-identical to the portable path's on the same CPU. Activations come in groups of 4 blocks of 4-byte units (UNIT, GROUP) and the weights
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
from typing import NamedTuple

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

from ..layout import CHUNK, SUPER
from . import FLAGS

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
V32I8, V16I16, V8I32 = ir.VectorType(I8, 32), ir.VectorType(I16, 16), ir.VectorType(I32, 8)
V4I32, V16I8 = ir.VectorType(I32, 4), ir.VectorType(I8, 16)
V8F32 = ir.VectorType(F32, 8)
BLOCKS = 8  # blocks of 32 columns per loop step
STEP = 1.0 / 127.0  # a group's scale is its int8 times super-scale * STEP (as float32: codec.group_scales)
BITS = {"q4": 4, "q5": 5, "q6": 6, "q8": 8}
OFFSETS = {"q4": 8, "q5": 16, "q6": 32}  # q4-q6 store q + 2**(bits - 1)
HIGH_BYTES = {"q5": 4, "q6": 8}  # bytes of high bits per block
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


def _broadcast(builder, value, vty: ir.VectorType):
    """The run-time value in every lane of vty."""
    empty = ir.Constant(vty, None)
    return builder.shuffle_vector(builder.insert_element(empty, value, ir.Constant(I32, 0)), empty,
                                  ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count))


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
    """Horizontal sum of a float vector, in halves: for <8 x float>, 4 + 4, 2 + 2, 1 + 1."""
    width = v.type.count // 2
    while width:
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, width), list(range(width, 2 * width))))
        v = builder.fadd(lo, hi)
        width //= 2
    return builder.extract_element(v, ir.Constant(I32, 0))


def _fma(builder, a, b, c):
    return _call(builder, "llvm.fmuladd.v8f32", V8F32, a, b, c)


def _row_scales(builder, srow, urow, b, shift, unit: float, broadcast_first: bool):
    """<8 x float> weight scales of blocks b .. b+7, times `unit` / STEP: group g = (b + k) >> shift has scale
    k_g * D * unit, k_g the int8 at srow[g] and D the bfloat16 at urow[g // SUPER], the same for the whole step
    (layout.SUPER groups span at least one step of BLOCKS blocks). D * unit is one float32 product, computed
    once (x86) or in every lane from D's bits broadcast (arm64: ld1r, shll and fmul are one instruction fewer).

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
    if broadcast_first:
        ds = _broadcast(builder, d, ir.VectorType(I16, 8))
        ds = builder.bitcast(builder.shl(builder.zext(ds, V8I32), _splat(V8I32, 16)), V8F32)
        steps = builder.fmul(ds, _splat(V8F32, unit))
    else:
        d = builder.bitcast(builder.shl(builder.zext(d, I32), ir.Constant(I32, 16)), F32)
        step = builder.fmul(d, ir.Constant(F32, unit))
        steps = _broadcast(builder, step, V8F32)
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


class _Stream:
    """arm64: a pointer that moves past what is loaded from it, so that each load takes its address by
    post-increment. After each move the pointer is made opaque to LLVM (an empty asm returning it): otherwise
    LLVM folds the moves into offsets from one base, which loads of several registers (ld1, ld4) cannot take,
    and adds an instruction per load."""

    def __init__(self, builder, at):
        self.builder, self.at = builder, at

    def take(self, nbytes: int, load):
        """load(builder, at) at the pointer, which then moves nbytes on."""
        value = load(self.builder, self.at)
        self.skip(nbytes)
        return value

    def skip(self, nbytes: int):
        moved = self.builder.gep(self.at, [ir.Constant(I64, nbytes)], inbounds=True)
        self.at = self.builder.asm(ir.FunctionType(moved.type, [moved.type]), "", "=r,0", [moved], False)

    def wait(self, vector):
        """The next load waits for a vector: LLVM's scheduler otherwise loads ahead, runs out of the 32 vector
        registers in the 1 x 4 tile and spills (an out-of-order core needs no loads hoisted for it)."""
        self.at = self.builder.asm(ir.FunctionType(self.at.type, [self.at.type, vector.type]), "", "=r,0,w",
                                   [self.at, vector], False)


def _words(builder, stream: _Stream, n: int, picks):
    """<16 x i8> vectors of the words picked (lists of 4 indices) out of the stream's next n 32-bit words."""
    v = stream.take(4 * n, lambda b, at: b.load(b.bitcast(at, ir.VectorType(I32, n).as_pointer()), align=1))
    return [builder.bitcast(builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), p)), V16I8) for p in picks]


def _group_weights(builder, kind: str, codes: _Stream, high: _Stream | None):
    """arm64: the next 4 blocks of a row's codes (q5 / q6: and of its high bits) as 8 <16 x i8>, in the order of the dotprod arrangement's units (w, h): lane m's 4 bytes are block m's columns
    16h + 4w .. +3. q4-q6 take word w of each block's nibbles (one interleaved load: ld4), the low nibbles for
    h = 0, the high for h = 1, with their high bits: q5's word per block holds column 4w + e's in byte e at bit
    4 + w (h = 0) or w (h = 1); q6's word w % 2 of 2 per block holds them in byte e at bits 2 (w // 2) (h = 0)
    or 4 + 2 (w // 2) (h = 1). q8 takes word 4h + w of each block's 8."""
    if kind == "q8":  # two blocks per ld4: word w and 4 + w of each, then the 4 blocks' words w and 4 + w apart
        halves = [codes.take(64, _ld4) for _ in range(2)]
        return [builder.bitcast(builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 4), list(range(h, 8, 2)))),
                                V16I8) for a, b in zip(*halves, strict=True) for h in range(2)]
    raw = _words(builder, codes, 16, [[4 * m + w for m in range(4)] for w in range(4)])
    if kind == "q4":
        return [u for r in raw for u in (builder.and_(r, _splat(V16I8, 0x0F)), builder.lshr(r, _splat(V16I8, 4)))]
    if kind == "q5":  # nibbles swapped, so that column 4w + e's bit sits at w (h = 0) and 4 + w (h = 1), as q6's do
        word = _words(builder, high, 4, [list(range(4))])[0]
        swapped = _call(builder, "llvm.aarch64.neon.vsli.v16i8", V16I8, builder.lshr(word, _splat(V16I8, 4)), word,
                        ir.Constant(I32, 4))
        highs, shifts, mask = [swapped] * 4, range(4), 1
    else:
        highs = _words(builder, high, 8, [[2 * m + p for m in range(4)] for p in range(2)]) * 2
        shifts, mask = (0, 0, 2, 2), 3
    four = ir.Constant(I32, 4)  # shift-and-insert: the nibble and its high bits in one instruction each
    units = []
    for r, bits, shift in zip(raw, highs, shifts, strict=True):
        bits = builder.lshr(bits, _splat(V16I8, shift)) if shift else bits
        units += [_call(builder, "llvm.aarch64.neon.vsli.v16i8", V16I8, r, builder.and_(bits, _splat(V16I8, mask)), four),
                  _call(builder, "llvm.aarch64.neon.vsri.v16i8", V16I8, builder.and_(bits, _splat(V16I8, mask << 4)), r, four)]
    return units


def _ld4(builder, at):
    """<4 x i32> x 4 of the 64 bytes at `at`, word k of 16 in vector k % 4 (ld4)."""
    v4 = ir.VectorType(I32, 4)
    both = _call(builder, "llvm.aarch64.neon.ld4.v4i32.p0", ir.LiteralStructType([v4] * 4), at)
    return [builder.extract_value(both, k) for k in range(4)]


def _ld1x4(builder, at):
    """<16 x i8> x 4 of the 64 bytes at `at`, in one load (ld1 of 4 registers)."""
    four = _call(builder, "llvm.aarch64.neon.ld1x4.v16i8.p0", ir.LiteralStructType([V16I8] * 4), at)
    return [builder.extract_value(four, k) for k in range(4)]


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
    # q5: 4 bytes per block (codec.q5_bit): one variable shift per 32 bits brings each lane's bit to bit 4
    words = builder.shuffle_vector(step_words, step_words, ir.Constant(V8I32, [2 * k] * 4 + [2 * k + 1] * 4))
    low = builder.lshr(words, ir.Constant(V8I32, [0, 1, 2, 3] * 2))  # columns 0..15: bits 8b + 4 + a
    high = builder.shl(words, ir.Constant(V8I32, [4, 3, 2, 1] * 2))  # columns 16..31: bits 8b + a
    return [builder.and_(builder.bitcast(v, V32I8), _splat(V32I8, 0x10)) for v in (low, high)]


class _Operands(NamedTuple):
    """What one kernel call works on, as IR values: one weight row, nt tokens."""

    isa: str  # target_isa's names
    kind: str  # q4, q5, q6, q8
    crow: ir.Value  # i8* the row's codes (q4-q6: nibbles, then from high_at on, high bits)
    srow: ir.Value  # i8* its int8 group scales
    urow: ir.Value  # i8* its bfloat16 super-scales
    high_at: ir.Value  # i64 byte offset of the high bits in crow (cols_pad / 2)
    shift: ir.Value  # i64 block index >> shift = group index
    xq_rows: list  # per token: i8* arranged int8 activations
    xs_rows: list  # per token: i8* f32 block scales x_b
    xsum_rows: list  # per token: i8* f32 x_b * sum(xq) per block
    accs: list  # per token: <8 x float>* accumulator of scaled block sums

    @property
    def offset(self) -> float:
        """The weights' stored offset, taken out as offset * xsum per block: q4-q6 store q + 2**(bits - 1); q8
        with VNNI multiplies c + 128 as u8."""
        return float(OFFSETS.get(self.kind, 128 if self.isa == "vnni" else 0))


def _make_dot(kind: str, nt: int):
    """An intrinsic (codes, scales, supers, r, xqa, xs, xsum, t0, nb, shift) -> nt float32 dot products: row r
    with tokens t0 .. t0+nt-1.

    codes: u8 [rows, cols_pad * bits / 8] (q4, q5, q6: layout's nibbles, then high bits) or i8 [rows, cols_pad]
    (q8), scales i8 [rows, groups], supers u16 (bfloat16) [rows, ceil(groups / SUPER)];
    xqa int8 [T, cols_pad] arranged (UNIT, GROUP), xs and xsum f32 [T, cols_pad / 32]; blocks [0, nb), nb a
    multiple of 8; block b's scale is scales[r, g] * supers[r, g // SUPER] / 127, g = b >> shift.
    Weights are unpacked once for the nt tokens. The products are x86 instructions, sdot (arm64) or portable
    vector IR, reduced per block, as target_isa says.
    Arrays are taken whole, with the row index, as slicing them per row costs reference counting.
    """

    def codegen(context, builder, sig, args):
        return emit_dot(target_isa(), kind, nt, context, builder, sig, args)

    def typer(typingctx, codes, scales, supers, r, xqa, xs, xsum, t0, nb, shift):
        arrays = (codes, scales, supers, xqa, xs, xsum)
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in arrays):
            return None
        i64 = types.int64
        sig = types.UniTuple(types.float32, nt)(codes, scales, supers, i64, xqa, xs, xsum, i64, i64, i64)
        return sig, codegen

    typer.__name__ = f"{kind}_dot1x{nt}"
    return intrinsic(typer)


def emit_dot(isa: str, kind: str, nt: int, context, builder, sig, args):
    """The body of _make_dot's intrinsic as `isa` (target_isa's names) runs it; apart, so that the IR of
    another CPU's kernels can be looked at here (tests/test_arm64_asm.py)."""
    r, t0, nb, shift = args[3], args[7], args[8], args[9]
    codes, codes_stride = _bytes(context, builder, sig.args[0], args[0])

    def rows(k, first, n):
        base, stride = _bytes(context, builder, sig.args[k], args[k])
        return [builder.gep(base, [builder.mul(builder.add(first, ir.Constant(I64, i)), stride)], inbounds=True)
                for i in range(n)]

    op = _Operands(
        isa, kind, builder.gep(codes, [builder.mul(r, codes_stride)], inbounds=True), rows(1, r, 1)[0],
        rows(2, r, 1)[0], builder.udiv(builder.mul(codes_stride, ir.Constant(I64, 4)), ir.Constant(I64, BITS[kind])),
        shift, rows(4, t0, nt), rows(5, t0, nt), rows(6, t0, nt),
        # one accumulator per token, the offset term taken out block by block (a second accumulator per token
        # would leave the 1 x 4 loop too few of AVX2's 16 vector registers)
        [cgutils.alloca_once_value(builder, _splat(V8F32, 0.0)) for _ in range(nt)])
    steps = builder.udiv(nb, ir.Constant(I64, BLOCKS))
    if isa == "dotprod":
        _dotprod_loop(builder, op, steps)
    else:
        with cgutils.for_range(builder, steps) as loop:
            _vector_step(builder, op, builder.mul(loop.index, ir.Constant(I64, BLOCKS)))
    sums = [_hsum(builder, builder.load(acc)) for acc in op.accs]
    return context.make_tuple(builder, sig.return_type, sums)


def _vector_step(builder, op: _Operands, b):
    """x86 and portable: blocks b .. b+7 of the row into the accumulators."""
    step = builder.mul(b, ir.Constant(I64, 32 if op.kind == "q8" else 16))
    high = HIGH_BYTES.get(op.kind)
    high_step = high and builder.gep(op.crow, [builder.add(op.high_at, builder.mul(b, ir.Constant(I64, high)))])
    _prefetch(builder, op.kind, builder.gep(op.crow, [step]), high_step)
    ints = [[] for _ in op.xq_rows]  # per pair of blocks: <8 x i32> partial sums (x86) or 2 sums (portable)
    # q5 / q6: the step's high bits (4 or 8 bytes per block), in one load
    step_words = high and _load(builder, high_step, ir.Constant(I64, 0), ir.VectorType(I32 if high == 4 else I64, 8))
    for k in range(BLOCKS // 2):
        pair = builder.add(b, ir.Constant(I64, 2 * k))
        xoff = builder.mul(pair, ir.Constant(I64, 32))  # 64 bytes of arranged activations per pair
        xv = [(_load(builder, row, xoff, V32I8), _load(builder, row, builder.add(xoff, ir.Constant(I64, 32)), V32I8))
              for row in op.xq_rows]
        lo, hi = _pair_weights(builder, op, pair, xoff, step_words, k)
        for j, (xlo, xhi) in enumerate(xv):
            if op.isa == "portable":
                ints[j].extend(_block_sums_portable(builder, [(lo, xlo), (hi, xhi)], op.kind == "q8"))
                continue
            ints[j].append(_pair_sums(builder, op, lo, hi, xlo, xhi))
            if k % 2:  # fold two pairs' sums at once: a token holds at most two live vectors, not four
                ints[j][-2:] = [_phadd(builder, *ints[j][-2:])]
    isums = [_gathered(builder, v) if op.isa == "portable" else _per_block(builder, v) for v in ints]
    xs_off = builder.mul(b, ir.Constant(I64, 4))
    _accumulate(builder, op, b, isums, [builder.gep(row, [xs_off]) for row in op.xs_rows],
                [builder.gep(row, [xs_off]) for row in op.xsum_rows])


def _pair_weights(builder, op: _Operands, pair, xoff, step_words, k: int):
    """x86 and portable: pair k of a step as two <32 x i8> matching the arranged activations' halves: for q4 one
    load of nibbles, masked (low) and shifted (high), q5 and q6 or-ing in their high bits (_high_bits); for q8
    the blocks' first halves, then their second (as u8 c + 128 with VNNI)."""
    if op.kind == "q8":
        lo = _concat16(builder, op.crow, xoff, builder.add(xoff, ir.Constant(I64, 32)))
        hi = _concat16(builder, op.crow, builder.add(xoff, ir.Constant(I64, 16)), builder.add(xoff, ir.Constant(I64, 48)))
        if op.isa == "vnni":
            return builder.xor(lo, _splat(V32I8, 0x80)), builder.xor(hi, _splat(V32I8, 0x80))
        return lo, hi
    nib = _load(builder, op.crow, builder.mul(pair, ir.Constant(I64, 16)), V32I8)
    lo = builder.and_(nib, _splat(V32I8, 0x0F))
    hi = builder.and_(builder.lshr(nib, _splat(V32I8, 4)), _splat(V32I8, 0x0F))
    if op.kind == "q4":
        return lo, hi
    hlo, hhi = _high_bits(builder, op.kind, step_words, k)
    return builder.or_(lo, hlo), builder.or_(hi, hhi)


def _pair_sums(builder, op: _Operands, lo, hi, xlo, xhi):
    """x86: <8 x i32> partial sums of a pair of blocks' weights (lo, hi) with one token's activations."""
    if op.kind == "q8" and op.isa == "avx2":  # |c| * sign(xq, c)
        pairs = [(_abs8(builder, w), _call(builder, "llvm.x86.avx2.psign.b", V32I8, x, w)) for w, x in ((lo, xlo), (hi, xhi))]
    else:
        pairs = [(lo, xlo), (hi, xhi)]
    return _dot_u8s8(builder, op.isa == "vnni", pairs, wide=op.kind == "q8")


def _dotprod_loop(builder, op: _Operands, steps):
    """arm64 with sdot: the row's steps, its weights, the activations and their scales read as streams (_Stream)
    whose pointers are the loop's induction variables.

    Per group of 4 blocks, 8 signed dot products of 4 bytes (sdot) of one weight unit and one activation
    unit (_group_weights, and the activations' arrangement GROUP x UNIT) sum each block in its own lane:
    no horizontal adds. Signed products are exact: q4-q6 codes with their high bits are 0..63, q8 codes
    and activations int8. Weights are unpacked once per group, then each token's 128 bytes of activations
    (ld1 of 4 registers, twice) meet them and its sums go straight into its accumulator, one token after the
    other (_Stream.wait), so that the 1 x 4 tile keeps few vectors live."""
    high = HIGH_BYTES.get(op.kind)
    nt = len(op.xq_rows)

    def step(index, pointers):
        streams = [_Stream(builder, p) for p in pointers]
        codes = streams.pop(0)
        high_bits = streams.pop(0) if high else None
        xq, xs, xsum = streams[:nt], streams[nt: 2 * nt], streams[2 * nt:]
        _prefetch(builder, op.kind, codes.at, high_bits and high_bits.at)
        ws = _row_scales(builder, op.srow, op.urow, builder.mul(index, ir.Constant(I64, BLOCKS)), op.shift,
                         STEP * -op.offset if op.offset else STEP, broadcast_first=True)
        isum = None
        for g in range(BLOCKS // 4):
            if isum is not None:
                codes.wait(isum)
            units = _group_weights(builder, op.kind, codes, high_bits)
            for j in range(nt):
                if j:
                    xq[j].wait(isum)
                x = xq[j].take(64, _ld1x4) + xq[j].take(64, _ld1x4)
                isum = _splat(V4I32, 0)
                for w, a in zip(units, x, strict=True):
                    isum = _call(builder, "llvm.aarch64.neon.sdot.v4i32.v16i8", V4I32, isum, w, a)
                _accumulate_group(builder, op, g, isum, ws, xs[j], xsum[j] if op.offset else None, op.accs[j])
        return [s.at for s in [codes, *([high_bits] if high else []), *xq, *xs, *xsum]]

    starts = [op.crow, *([builder.gep(op.crow, [op.high_at])] if high else []), *op.xq_rows, *op.xs_rows, *op.xsum_rows]
    _pointer_loop(builder, steps, starts, step)


def _load4f(builder, at):
    return builder.load(builder.bitcast(at, ir.VectorType(F32, 4).as_pointer()), align=1)


def _half(builder, v, g: int):
    """Lanes 4g .. 4g+3 of a <8 x ...>."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, 4), list(range(4 * g, 4 * g + 4))))


def _accumulate_group(builder, op: _Operands, g: int, isum, ws, xs: _Stream, xsum: _Stream | None, acc):
    """arm64: acc += w_b (x_b isum_b - offset xsum_b) for the 4 blocks of group g of a step (isum <4 x i32>; ws,
    xs, xsum and acc <8 x float> of the step's 8 blocks), computed as (xsum_b - (isum_b / offset) x_b) times
    w_b * -offset (_row_scales), which rounds exactly as x86's form does: both are the same values times a power
    of two (isum_b / offset is exact: scvtf with fraction bits), and rounding commutes with that. One fused
    multiply-subtract then takes the place of a multiply and a fused multiply-add. The accumulator's lanes are
    x86's, so its sum too is x86's."""
    v4f = ir.VectorType(F32, 4)
    if op.offset:
        part = _call(builder, "llvm.aarch64.neon.vcvtfxs2fp.v4f32.v4i32", v4f, isum,
                     ir.Constant(I32, int(op.offset).bit_length() - 1))
        blocks = _call(builder, "llvm.fmuladd.v4f32", v4f, builder.fneg(part), xs.take(16, _load4f), xsum.take(16, _load4f))
    else:
        blocks = builder.fmul(builder.sitofp(isum, v4f), xs.take(16, _load4f))
    whole = builder.load(acc)
    summed = _call(builder, "llvm.fmuladd.v4f32", v4f, _half(builder, ws, g), blocks, _half(builder, whole, g))
    other = _half(builder, whole, 1 - g)
    halves = (summed, other) if g == 0 else (other, summed)
    builder.store(builder.shuffle_vector(*halves, ir.Constant(V8I32, list(range(8)))), acc)


def _pointer_loop(builder, count, starts, step) -> list:
    """A loop of `count` iterations of step(index, values) -> the values of the next iteration (pointers, or
    sums carried in registers), the values starting at `starts`; returns their values after the loop."""
    zero = ir.Constant(I64, 0)
    entry = builder.block
    body = builder.append_basic_block("walk")
    done = builder.append_basic_block("walk.end")
    builder.cbranch(builder.icmp_unsigned(">", count, zero), body, done)
    builder.position_at_end(body)
    index = builder.phi(I64)
    pointers = [builder.phi(start.type) for start in starts]
    following = step(index, pointers)
    last = builder.block
    next_index = builder.add(index, ir.Constant(I64, 1))
    index.add_incoming(zero, entry)
    index.add_incoming(next_index, last)
    for p, start, moved in zip(pointers, starts, following, strict=True):
        p.add_incoming(start, entry)
        p.add_incoming(moved, last)
    builder.cbranch(builder.icmp_unsigned("<", next_index, count), body, done)
    builder.position_at_end(done)
    after = []
    for start, moved in zip(starts, following, strict=True):
        value = builder.phi(start.type)
        value.add_incoming(start, entry)
        value.add_incoming(moved, last)
        after.append(value)
    return after


def _prefetch(builder, kind: str, at, high):
    """Prefetches PREFETCH_BYTES ahead of a step's codes at `at` (the next rows' near the end), and as far ahead in
    columns of its high bits at `high` (at most one line per step): the hardware prefetcher alone leaves a thread at
    15 GB/s from RAM; this way, 20."""
    lines = [builder.gep(at, [ir.Constant(I64, PREFETCH_BYTES + line)])
             for line in range(0, BLOCKS * (32 if kind == "q8" else 16), 64)]
    if high:
        lines.append(builder.gep(high, [ir.Constant(I64, PREFETCH_BYTES // 16 * HIGH_BYTES[kind])]))
    for line in lines:
        _call(builder, "llvm.prefetch.p0", ir.VoidType(), line, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1))


def _accumulate(builder, op: _Operands, b, isums, xs_at, xsum_at):
    """x86 and portable: acc_j += w_b (x_b isum_b - offset xsum_b) over blocks b .. b+7, from each token's integer
    block sums isums[j] and its block scales (xs_at[j]) and offset terms (xsum_at[j]) for the step."""
    zero = ir.Constant(I64, 0)
    xs8 = [_load(builder, at, zero, V8F32) for at in xs_at]
    # -offset * xsum per block: what the weights' stored offset added to each block's sum, times x_b
    xoff8 = [builder.fmul(_load(builder, at, zero, V8F32), _splat(V8F32, -op.offset)) for at in xsum_at
             ] if op.offset else None
    ws = _row_scales(builder, op.srow, op.urow, b, op.shift, STEP, broadcast_first=False)
    for j, acc in enumerate(op.accs):
        blocks = builder.sitofp(isums[j], V8F32)
        blocks = _fma(builder, blocks, xs8[j], xoff8[j]) if op.offset else builder.fmul(blocks, xs8[j])
        builder.store(_fma(builder, ws, blocks, builder.load(acc)), acc)


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


ERR_LANES = 16  # groups per scale_errors call


@intrinsic
def scale_errors(typingctx, xt, d, inv, err, g0, qmin, qmax):
    """err[g] = sum over i of (clip(rint(xt[i, g] * inv[g]), qmin, qmax) * d[g] - xt[i, g])**2 for the ERR_LANES
    groups g0 .. g0+ERR_LANES-1 (columns of xt f32 [gs, groups], C order; d, inv, err f32 1-D): the quantizer's
    error of a scale per group, summed down each column in order with separate multiplies and adds (no fast-math,
    no fused multiply-add), so each lane's sum is bit for bit the scalar loop's. The sums stay in registers across
    the column, where an auto-vectorized loop stores them back at every row."""
    if not (isinstance(xt, types.Array) and xt.ndim == 2 and xt.layout == "C" and xt.dtype == types.float32):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 for a in (d, inv, err)):
        return None
    sig = types.void(xt, d, inv, err, types.int64, types.float32, types.float32)

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(F32, ERR_LANES)
        base, stride = _bytes(context, builder, sig.args[0], args[0])
        rows = context.make_array(sig.args[0])(context, builder, args[0])
        gs = cgutils.unpack_tuple(builder, rows.shape, 2)[0]
        off = builder.mul(args[4], ir.Constant(I64, 4))
        dv, invv, errp = (builder.gep(_bytes(context, builder, ty, v)[0], [off], inbounds=True)
                          for ty, v in zip(sig.args[1:4], args[1:4], strict=True))
        dv, invv = _load(builder, dv, ir.Constant(I64, 0), vty), _load(builder, invv, ir.Constant(I64, 0), vty)
        lo, hi = (builder.insert_element(ir.Constant(vty, None), q, ir.Constant(I32, 0)) for q in args[5:7])
        lo, hi = (builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, ERR_LANES), [0] * ERR_LANES))
                  for v in (lo, hi))
        acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [ir.Constant(F32, 0.0)] * ERR_LANES))

        def step(i, pointers):
            x = _load(builder, pointers[0], ir.Constant(I64, 0), vty)
            q = _call(builder, f"llvm.rint.v{ERR_LANES}f32", vty, builder.fmul(x, invv))
            q = builder.select(builder.fcmp_ordered("<", q, lo), lo, q)  # NaN stays NaN, as numba's max and min
            q = builder.select(builder.fcmp_ordered(">", q, hi), hi, q)
            e = builder.fsub(builder.fmul(q, dv), x)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(e, e)), acc)
            return [builder.gep(pointers[0], [stride])]

        _pointer_loop(builder, gs, [builder.gep(base, [off], inbounds=True)], step)
        _store(builder, errp, ir.Constant(I64, 0), builder.load(acc))
        return context.get_dummy_value()

    return sig, codegen


def _wide_vnni(features: set[str]) -> bool:
    return {"avx512f", "avx512bw", "avx512vnni"} <= features


# Rows of a tile of the interleaved kernels (x86): one 32-bit lane each, of a 512-bit vector with AVX-512 VNNI
# (whose multiply-adds of 64 bytes run about as often as those of 32), else of a 256-bit one.
TILE_ROWS = 16 if target_has_x86_simd() and _wide_vnni(target_features()) else 8
TILE_TOKENS = 4  # tokens of a tile, as the 1 x 4 kernels take them (qmatmul tiles tokens by 4 for both)


def _transpose8(builder, vectors):
    """<8 x i32> x 8 -> their transpose: vector d holds lane d of each input, in order (interleaves of 32 bits,
    then of 64 within 128-bit halves, then of the halves)."""
    def shuffle(a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(V8I32, mask))

    pairs = [shuffle(vectors[i], vectors[i + 1], mask) for i in range(0, 8, 2)
             for mask in ([0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15])]
    quads = [[shuffle(pairs[4 * h + p], pairs[4 * h + p + 2], mask) for p in range(2)
              for mask in ([0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15])] for h in range(2)]
    return ([shuffle(quads[0][d], quads[1][d], [0, 1, 2, 3, 8, 9, 10, 11]) for d in range(4)]
            + [shuffle(quads[0][d], quads[1][d], [4, 5, 6, 7, 12, 13, 14, 15]) for d in range(4)])


def _make_interleave(kind: str):
    """An intrinsic (codes, scales, supers, r0, units, ws, nb, shift): rows r0 .. r0 + TILE_ROWS - 1 of q4 / q5 / q6
    weights over blocks [0, nb) (a multiple of 8), unpacked to bytes (with their high bits) and interleaved for
    dot_tile: for block b and its columns 4u .. 4u+3, the rows' 4 bytes side by side at units[(8b + u) * 4 *
    TILE_ROWS:] (u8 1-D); the blocks' weight scales, row after row, at ws[TILE_ROWS * b:] (f32 1-D), each computed as
    the 1 x NT kernels compute it."""

    def codegen(context, builder, sig, args):
        if not target_has_x86_simd():  # never called there (qmatmul.INTERLEAVED): no x86 instruction in its callers
            return context.get_dummy_value()
        return emit_interleave(target_isa(), kind, TILE_ROWS, context, builder, sig, args)

    def typer(typingctx, codes, scales, supers, r0, units, ws, nb, shift):
        if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in (codes, scales, supers)):
            return None
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (units, ws)):
            return None
        i64 = types.int64
        return types.void(codes, scales, supers, i64, units, ws, i64, i64), codegen

    typer.__name__ = f"{kind}_interleave"
    return intrinsic(typer)


def emit_interleave(isa: str, kind: str, lanes: int, context, builder, sig, args):
    """The interleave intrinsic's body: rows 8 at a time, each 8 unpacked (_pair_weights), transposed by 32-bit
    units (_transpose8) and stored at their lanes."""
    r0, nb, shift = args[3], args[6], args[7]
    codes, codes_stride = _bytes(context, builder, sig.args[0], args[0])
    units = _bytes(context, builder, sig.args[4], args[4])[0]
    ws = _bytes(context, builder, sig.args[5], args[5])[0]
    high = HIGH_BYTES.get(kind)
    high_at = builder.udiv(builder.mul(codes_stride, ir.Constant(I64, 4)), ir.Constant(I64, BITS[kind]))
    row_bytes = [_bytes(context, builder, sig.args[k], args[k]) for k in range(3)]

    def const(n):
        return ir.Constant(I64, n)

    with cgutils.for_range(builder, builder.udiv(nb, const(BLOCKS))) as loop:
        b = builder.mul(loop.index, const(BLOCKS))
        for eight in range(0, lanes, 8):
            rows = [builder.add(r0, const(eight + i)) for i in range(8)]
            ops = [_Operands(isa, kind, *(builder.gep(base, [builder.mul(r, stride)], inbounds=True) for base, stride in row_bytes),
                             high_at, shift, [], [], [], []) for r in rows]
            words = [high and _load(builder, builder.gep(op.crow, [builder.add(op.high_at, builder.mul(b, const(high)))]),
                                    const(0), ir.VectorType(I32 if high == 4 else I64, 8)) for op in ops]
            for k in range(BLOCKS // 2):
                pair = builder.add(b, const(2 * k))
                halves = zip(*[_pair_weights(builder, op, pair, None, w, k) for op, w in zip(ops, words, strict=True)],
                             strict=True)
                for h, vectors in enumerate(halves):  # columns 0-15 of the pair's two blocks, then 16-31
                    for d, v in enumerate(_transpose8(builder, [builder.bitcast(x, V8I32) for x in vectors])):
                        unit = builder.add(builder.mul(builder.add(pair, const(d // 4)), const(8)), const(4 * h + d % 4))
                        _store(builder, units, builder.add(builder.mul(unit, const(4 * lanes)), const(4 * eight)), v)
            scales = [builder.bitcast(_row_scales(builder, op.srow, op.urow, b, shift, STEP, broadcast_first=False), V8I32)
                      for op in ops]
            for d, v in enumerate(_transpose8(builder, scales)):
                at = builder.add(builder.mul(builder.add(b, const(d)), const(4 * lanes)), const(4 * eight))
                _store(builder, ws, at, builder.bitcast(v, V8F32))
    return context.get_dummy_value()


@intrinsic
def dot_tile(typingctx, units, ws, xq, xs, xsum, out, t0, r0, nb, offset):
    """out[t0 + j, r0 .. r0 + TILE_ROWS - 1] = the interleaved rows (units, ws: an interleave intrinsic's) times
    token t0 + j's 8-bit activations (xq natural, not arranged) over blocks [0, nb), for j < TILE_TOKENS; `offset`
    the weights' stored one.

    Lane i of a vector of 32-bit lanes is row i: a multiply-add of 4 bytes (the rows' units) by a token's 4
    activation bytes, broadcast, sums each row's block in its own lane: no horizontal adds, and each weight vector
    meets TILE_TOKENS tokens. Two integer sums per token (even and odd units) halve the chains of dependent
    multiply-adds. The float arithmetic is the 1 x NT kernels', lane for lane: per block x_b isum_b - offset xsum_b,
    times w_b, fused into one accumulator per block position b % 8 (the blocks taken in that order), the 8 then
    summed as _hsum sums a vector's lanes. So each row's result is bit for bit theirs."""
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" for a in (units, ws)):
        return None
    if not all(isinstance(a, types.Array) and a.ndim == 2 and a.layout == "C" for a in (xq, xs, xsum, out)):
        return None
    i64 = types.int64
    sig = types.void(units, ws, xq, xs, xsum, out, i64, i64, i64, types.float32)

    def codegen(context, builder, sig, args):
        if not target_has_x86_simd():  # as the interleave intrinsics
            return context.get_dummy_value()
        return emit_dot_tile(target_isa(), TILE_ROWS, TILE_TOKENS, context, builder, sig, args)

    return sig, codegen


def emit_dot_tile(isa: str, lanes: int, nt: int, context, builder, sig, args):
    t0, r0, nb, offset = args[6], args[7], args[8], args[9]
    units = _bytes(context, builder, sig.args[0], args[0])[0]
    ws = _bytes(context, builder, sig.args[1], args[1])[0]
    vi32, vf32, vi8 = ir.VectorType(I32, lanes), ir.VectorType(F32, lanes), ir.VectorType(I8, 4 * lanes)

    def const(n):
        return ir.Constant(I64, n)

    def rows(k):
        base, stride = _bytes(context, builder, sig.args[k], args[k])
        return [builder.gep(base, [builder.mul(builder.add(t0, const(j)), stride)], inbounds=True) for j in range(nt)]

    xq_rows, xs_rows, xsum_rows, out_rows = rows(2), rows(3), rows(4), rows(5)
    neg_offset = builder.fneg(offset)
    fma = f"llvm.fmuladd.v{lanes}f32"
    positions = [cgutils.alloca_once(builder, ir.ArrayType(vf32, BLOCKS)) for _ in range(nt)]
    accs = [cgutils.alloca_once(builder, vf32) for _ in range(nt)]
    zero32 = ir.Constant(I32, 0)
    with cgutils.for_range(builder, const(BLOCKS)) as position:
        for acc in accs:
            builder.store(_splat(vf32, 0.0), acc)
        with cgutils.for_range(builder, builder.udiv(nb, const(BLOCKS))) as loop:
            b = builder.add(builder.mul(loop.index, const(BLOCKS)), position.index)
            isums = [[_splat(vi32, 0)] * 2 for _ in range(nt)]
            for u in range(CHUNK // 4):
                w = _load(builder, units, builder.mul(builder.add(builder.mul(b, const(8)), const(u)), const(4 * lanes)), vi8)
                for j, row in enumerate(xq_rows):
                    x4 = _load(builder, row, builder.add(builder.mul(b, const(CHUNK)), const(4 * u)), I32)
                    isums[j][u % 2] = _dot4(builder, isa, isums[j][u % 2], w, builder.bitcast(_broadcast(builder, x4, vi32), vi8))
            wv = _load(builder, ws, builder.mul(b, const(4 * lanes)), vf32)
            for j in range(nt):
                xb = _load(builder, xs_rows[j], builder.mul(b, const(4)), F32)
                xo = builder.fmul(_load(builder, xsum_rows[j], builder.mul(b, const(4)), F32), neg_offset)
                blocks = builder.sitofp(builder.add(*isums[j]), vf32)
                blocks = _call(builder, fma, vf32, blocks, _broadcast(builder, xb, vf32), _broadcast(builder, xo, vf32))
                builder.store(_call(builder, fma, vf32, wv, blocks, builder.load(accs[j])), accs[j])
        for at, acc in zip(positions, accs, strict=True):
            builder.store(builder.load(acc), builder.gep(at, [zero32, builder.trunc(position.index, I32)]))
    for j in range(nt):
        v = [builder.load(builder.gep(positions[j], [zero32, ir.Constant(I32, c)])) for c in range(BLOCKS)]
        # _hsum's order
        halves = [builder.fadd(v[c], v[c + 4]) for c in range(4)]
        quarters = [builder.fadd(halves[c], halves[c + 2]) for c in range(2)]
        _store(builder, out_rows[j], builder.mul(r0, const(4)), builder.fadd(*quarters))
    return context.get_dummy_value()


def _dot4(builder, isa: str, acc, w, x):
    """acc + each 32-bit lane's sum of 4 products u8 * s8 (w, x: <4n x i8>, acc <n x i32>, n 8 or 16): vpdpbusd,
    or with AVX2 (n = 8) vpmaddubsw (two products of codes <= 63 and int8 activations fit int16) and vpmaddwd."""
    n = acc.type.count
    vi32 = ir.VectorType(I32, n)
    if isa == "vnni":
        return _call(builder, f"llvm.x86.avx512.vpdpbusd.{32 * n}", vi32, acc, builder.bitcast(w, vi32), builder.bitcast(x, vi32))
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", V16I16, w, x)
    return builder.add(acc, _call(builder, "llvm.x86.avx2.pmadd.wd", V8I32, pairs, _splat(V16I16, 1)))


def _store(builder, base, offset, value):
    builder.store(value, builder.bitcast(builder.gep(base, [offset], inbounds=True), value.type.as_pointer()), align=1)


def _abs8(builder, v):
    return _call(builder, "llvm.abs.v32i8", V32I8, v, ir.Constant(ir.IntType(1), 0))


LANES = 16  # partial sums of a float dot product, side by side


# How a row's elements are stored, and their bytes: float32; uint16 holding a bfloat16; int8, a code that a scale
# kept elsewhere multiplies (the q8 KV cache's rows; the caller applies the scale).
_ROW_ELEMENTS = {types.float32: (F32, 4), types.uint16: (I16, 2), types.int8: (I8, 1)}


class _FloatRow(NamedTuple):
    data: ir.Value  # i8*
    length: ir.Value  # i64
    elem: ir.Type  # as stored (_ROW_ELEMENTS)
    size: int  # bytes per element

    def load(self, builder, at, lanes: int):
        """Elements at the i8* `at` as float32: a <lanes x float>, or one float for lanes 0."""
        ty = ir.VectorType(self.elem, lanes) if lanes else self.elem
        v = builder.load(builder.bitcast(at, ty.as_pointer()), align=1)
        floats = ir.VectorType(F32, lanes) if lanes else F32
        if self.elem == F32:
            return v
        if self.elem == I8:
            return builder.sitofp(v, floats)
        wide = ir.VectorType(I32, lanes) if lanes else I32
        bits = builder.shl(builder.zext(v, wide), _splat(wide, 16) if lanes else ir.Constant(I32, 16))
        return builder.bitcast(bits, floats)


def _float_row(context, builder, aryty, value) -> _FloatRow:
    ary = context.make_array(aryty)(context, builder, value)
    length = cgutils.unpack_tuple(builder, ary.shape, 1)[0]
    return _FloatRow(builder.bitcast(ary.data, I8.as_pointer()), length, *_ROW_ELEMENTS[aryty.dtype])


def _float_rows(rows) -> bool:
    return all(isinstance(r, types.Array) and r.ndim == 1 and r.layout == "C"
               and r.dtype in _ROW_ELEMENTS for r in rows)


def _emit_lane_sums(context, builder, sig, args, products: bool):
    """The sum of row args[0] (products False), or its dot products with rows args[1:], in LANES lanes: column c
    in lane c % LANES while whole steps of LANES last, each lane in column order (fused multiply-adds where the
    target fuses), the lanes folded in halves, then the last columns added one by one."""
    rows = [_float_row(context, builder, ty, v) for ty, v in zip(sig.args, args, strict=True)]
    vty = ir.VectorType(F32, LANES)
    count = len(rows) - 1 if products else 1
    accs = [cgutils.alloca_once_value(builder, _splat(vty, 0.0)) for _ in range(count)]

    def add(j, pointers, lanes, acc):
        a = rows[0].load(builder, pointers[0], lanes)
        if not products:
            return builder.fadd(builder.load(acc), a)
        fma = f"llvm.fmuladd.v{lanes}f32" if lanes else "llvm.fmuladd.f32"
        return _call(builder, fma, a.type, a, rows[j + 1].load(builder, pointers[j + 1], lanes), builder.load(acc))

    def walk(lanes, totals):
        def step(index, pointers):
            for j, acc in enumerate(totals):
                builder.store(add(j, pointers, lanes, acc), acc)
            return [builder.gep(p, [ir.Constant(I64, max(lanes, 1) * r.size)]) for p, r in zip(pointers, rows, strict=True)]
        return step

    steps = builder.udiv(rows[0].length, ir.Constant(I64, LANES))
    _pointer_loop(builder, steps, [r.data for r in rows], walk(LANES, accs))
    totals = [cgutils.alloca_once_value(builder, _hsum(builder, builder.load(acc))) for acc in accs]
    done = builder.mul(steps, ir.Constant(I64, LANES))
    rest = [builder.gep(r.data, [builder.mul(done, ir.Constant(I64, r.size))]) for r in rows]
    _pointer_loop(builder, builder.sub(rows[0].length, done), rest, walk(0, totals))
    values = [builder.load(total) for total in totals]
    return context.make_tuple(builder, sig.return_type, values) if len(values) > 1 else values[0]


# Float sums in a fixed order. A fast-math loop lets LLVM choose the order of its sum, and LLVM chose differently
# for the same source compiled afresh (numba's parallel loops run their own compiled copy) than in the copy numba
# cached: a prompt's logits then depended on whether the process had compiled its kernels. Written out here, the
# order is the same wherever the kernel is compiled, and each x's sum has the same bits from dot1 as from dot4.
@intrinsic
def lane_sum(typingctx, a):
    """sum(a) of a 1-D row, float32, uint16 (bfloat16 bits) or int8, in LANES lanes (_emit_lane_sums)."""
    if not _float_rows((a,)):
        return None
    return types.float32(a), lambda context, builder, sig, args: _emit_lane_sums(context, builder, sig, args, False)


@intrinsic
def dot1(typingctx, a, x):
    """a . x for 1-D rows, float32, uint16 (bfloat16 bits) or int8, x at least as long as a (_emit_lane_sums)."""
    if not _float_rows((a, x)):
        return None
    return types.float32(a, x), lambda context, builder, sig, args: _emit_lane_sums(context, builder, sig, args, True)


@intrinsic
def dot4(typingctx, a, x0, x1, x2, x3):
    """(a . x0, a . x1, a . x2, a . x3), each the bits of dot1(a, x_j), a read once per step for all four."""
    if not _float_rows((a, x0, x1, x2, x3)):
        return None
    sig = types.UniTuple(types.float32, 4)(a, x0, x1, x2, x3)
    return sig, lambda context, builder, sig, args: _emit_lane_sums(context, builder, sig, args, True)


AXPY_LANES, AXPY_VECTORS = 8, 8  # a pass of axpy_rows: columns per vector, and vectors held in registers


@intrinsic
def axpy_rows(typingctx, acc, w, rows, start, n):
    """acc[c] += w[j] * rows[start + j, c] for j < n, in that order for each column c (fused multiply-adds where the
    target fuses): the bits of the plain loop. acc f32 1-D, w f32 1-D of at least n, rows f32, uint16 (bfloat16
    bits) or int8 2-D C-contiguous, at least as wide as acc, with rows start .. start + n - 1 (the caller checks: raw
    pointers). Columns go in passes of AXPY_VECTORS vectors held in registers over all n rows, so acc is read and
    written once per pass rather than once per row; then single vectors, then single columns."""
    if not (_float_rows((acc, w)) and acc.dtype == w.dtype == types.float32 and isinstance(rows, types.Array)
            and rows.ndim == 2 and rows.layout == "C" and rows.dtype in _ROW_ELEMENTS):
        return None

    def codegen(context, builder, sig, args):
        out, weights = (_float_row(context, builder, ty, v) for ty, v in zip(sig.args[:2], args[:2], strict=True))
        ary = context.make_array(sig.args[2])(context, builder, args[2])
        stride = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
        elem, size = _ROW_ELEMENTS[sig.args[2].dtype]
        first = builder.gep(builder.bitcast(ary.data, I8.as_pointer()), [builder.mul(args[3], stride)])
        row = _FloatRow(first, out.length, elem, size)

        def columns(col, count: int, lanes: int):
            """count accumulators of `lanes` columns (0: one column) from column col, over the n rows."""
            ty = ir.VectorType(F32, lanes) if lanes else F32
            width = max(lanes, 1)
            at = builder.gep(out.data, [builder.mul(col, ir.Constant(I64, 4))])
            slots = [builder.bitcast(builder.gep(at, [ir.Constant(I64, 4 * width * i)]), ty.as_pointer())
                     for i in range(count)]
            fma = f"llvm.fmuladd.v{lanes}f32" if lanes else "llvm.fmuladd.f32"

            def step(index, values):
                at_row, at_w, *sums = values
                x = builder.load(builder.bitcast(at_w, F32.as_pointer()), align=1)
                if lanes:
                    x = _broadcast(builder, x, ty)
                vs = [row.load(builder, builder.gep(at_row, [ir.Constant(I64, size * width * i)]), lanes)
                      for i in range(count)]
                return [builder.gep(at_row, [stride]), builder.gep(at_w, [ir.Constant(I64, 4)]),
                        *(_call(builder, fma, ty, x, v, s) for v, s in zip(vs, sums, strict=True))]

            starts = [builder.gep(row.data, [builder.mul(col, ir.Constant(I64, size))]), weights.data,
                      *(builder.load(slot, align=1) for slot in slots)]
            for slot, total in zip(slots, _pointer_loop(builder, args[4], starts, step)[2:], strict=True):
                builder.store(total, slot, align=1)

        def passes(begin, end, count: int, lanes: int):
            """Columns [begin, end) in passes of count * lanes; returns where they stop."""
            width = ir.Constant(I64, count * max(lanes, 1))
            n_passes = builder.udiv(builder.sub(end, begin), width)
            with cgutils.for_range(builder, n_passes) as loop:
                columns(builder.add(begin, builder.mul(loop.index, width)), count, lanes)
            return builder.add(begin, builder.mul(n_passes, width))

        zero = ir.Constant(I64, 0)
        vectors = builder.sub(out.length, builder.urem(out.length, ir.Constant(I64, AXPY_LANES)))
        done = passes(zero, vectors, AXPY_VECTORS, AXPY_LANES)
        done = passes(done, vectors, 1, AXPY_LANES)
        passes(done, out.length, 1, 0)
        return context.get_dummy_value()

    return types.void(acc, w, rows, start, n), codegen


_FLUSH_BITS = {"x86": 0x8040, "arm64": 1 << 24}  # MXCSR's flush-to-zero and denormals-are-zero; FPCR.FZ


def _float_mode_arch() -> str | None:
    """Whose float mode register the process has: "x86", "arm64", or None (left alone)."""
    arch = llvm.get_process_triple().split("-")[0]
    return "x86" if arch in ("x86_64", "amd64") else "arm64" if arch in ("aarch64", "arm64") else None


def _get_float_mode(builder, arch: str):
    """This thread's float mode register (MXCSR or FPCR) as an i64."""
    if arch == "x86":
        slot = cgutils.alloca_once(builder, I32)
        _call(builder, "llvm.x86.sse.stmxcsr", ir.VoidType(), builder.bitcast(slot, I8.as_pointer()))
        return builder.zext(builder.load(slot), I64)
    return _call(builder, "llvm.aarch64.get.fpcr", I64)


def _set_float_mode(builder, arch: str, mode) -> None:
    if arch == "x86":
        slot = cgutils.alloca_once_value(builder, builder.trunc(mode, I32))
        _call(builder, "llvm.x86.sse.ldmxcsr", ir.VoidType(), builder.bitcast(slot, I8.as_pointer()))
    else:
        _call(builder, "llvm.aarch64.set.fpcr", ir.VoidType(), mode)


@intrinsic
def flush_denormals(typingctx):
    """Makes this thread's float arithmetic treat denormal inputs and results as zero (_FLUSH_BITS; elsewhere than
    x86 and arm64 nothing changes) and returns its float mode before, for restore_float_mode. Denormals take the
    CPU's slow path, 50-100x per operation; flushed, they are values below 1.2e-38."""
    def codegen(context, builder, sig, args):
        arch = _float_mode_arch()
        if arch is None:
            return ir.Constant(I64, 0)
        old = _get_float_mode(builder, arch)
        _set_float_mode(builder, arch, builder.or_(old, ir.Constant(I64, _FLUSH_BITS[arch])))
        return old

    return types.int64(), codegen


@intrinsic
def restore_float_mode(typingctx, mode):
    """Puts back the float mode flush_denormals returned."""
    def codegen(context, builder, sig, args):
        arch = _float_mode_arch()
        if arch is not None:
            _set_float_mode(builder, arch, args[0])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(**FLAGS)
def row_dots(a, rows, start, n, out):
    """out[j] = a . rows[start + j] for j < n, rows 2-D C-contiguous: four rows per dot4 while they last, then dot1;
    each the bits of dot1, however the rows fall into fours."""
    quads = n - n % 4
    for j in range(0, quads, 4):
        r = start + j
        s = dot4(a, rows[r], rows[r + 1], rows[r + 2], rows[r + 3])
        for u in range(4):
            out[j + u] = s[u]
    for j in range(quads, n):
        out[j] = dot1(a, rows[start + j])


# (rows, tokens) tiles: 1 x 4 for prefill, 1 x 1 for decode (rows one after another: one stream from memory)
q4_dot1x4, q4_dot1x1 = (_make_dot("q4", nt) for nt in (4, 1))
q5_dot1x4, q5_dot1x1 = (_make_dot("q5", nt) for nt in (4, 1))
q6_dot1x4, q6_dot1x1 = (_make_dot("q6", nt) for nt in (4, 1))
q8_dot1x4, q8_dot1x1 = (_make_dot("q8", nt) for nt in (4, 1))
q4_interleave, q5_interleave, q6_interleave = (_make_interleave(kind) for kind in ("q4", "q5", "q6"))
