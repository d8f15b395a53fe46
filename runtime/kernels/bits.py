"""Scalar conversions of 16-bit float bit patterns to float32 (numba has no float16 type), and
`weight_to_f32`: any stored weight (a float, or bfloat16 / float16 bits) as float32."""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .simd import target_features

_F16_EXP = np.uint32(0x7C00 << 13)  # float16 exponent field, moved to float32's mantissa-aligned position
_REBIAS = np.uint32((127 - 15) << 23)
_ONE_EXP = np.uint32(1 << 23)
_SUBNORMAL_MAGIC = np.float32(2.0**-14)  # the float32 whose bits are (127 - 14) << 23


@intrinsic
def u32_as_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (truncate + bitcast; vectorizes).

    numba widens uint32 arithmetic to 64 bits, hence any integer type is taken.
    """
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0]
        if bits.bitwidth > 32:
            low = builder.trunc(low, ir.IntType(32))
        elif bits.bitwidth < 32:
            low = builder.zext(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32, as a uint32."""
    if x != types.float32:
        return None
    return types.uint32(x), lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(32))


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    return u32_as_f32(np.uint32(h) << np.uint32(16))


@njit(cache=True, inline="always")
def f32_to_bf16(x):
    """The bfloat16 nearest to a finite float32 x (ties to even), as its 16-bit pattern."""
    b = f32_bits(np.float32(x))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, inline="always")
def f16_to_f32_exact(h):
    """Exact IEEE half -> single in integer arithmetic, for CPUs without a half-precision conversion.

    Normal numbers re-bias the exponent; inf/nan get float32's all-ones exponent; subnormals
    (exponent 0) are made normal with exponent 1 and the implicit one subtracted as a float.
    """
    m = (np.uint32(h) & np.uint32(0x7FFF)) << np.uint32(13)
    e = m & _F16_EXP
    o = m + _REBIAS
    if e == _F16_EXP:
        o += _REBIAS
    sub = e == np.uint32(0)
    if sub:
        o += _ONE_EXP
    f = u32_as_f32(o)
    if sub:
        f -= _SUBNORMAL_MAGIC
    if np.uint32(h) & np.uint32(0x8000):
        f = -f
    return f


def hardware_half() -> bool:
    """Whether the CPU numba compiles for converts half to single in one instruction (x86 F16C, any arm64)."""
    return platform.machine().lower() in ("arm64", "aarch64") or "f16c" in target_features()


@intrinsic
def f16_to_f32(typingctx, h):
    """IEEE half bits (any integer type, low 16 bits) -> float32, exactly: LLVM's fpext from half when the
    target converts in hardware (vcvtph2ps, fcvt; vectorizes), else f16_to_f32_exact."""
    if not isinstance(h, types.Integer):
        return None
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        if not hardware_half():
            return context.compile_internal(builder, f16_to_f32_exact.py_func, signature, args)
        v = args[0]
        if h.bitwidth > 16:
            v = builder.trunc(v, ir.IntType(16))
        return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

    return sig, codegen


# What a stored weight is, for weight_to_f32: a float, or the 16-bit pattern of a bfloat16 or a float16.
FLOAT, BF16_BITS, F16_BITS = 0, 1, 2


def weight_to_f32(v, kind):
    """One stored weight as float32: a float as is; 16-bit patterns as kind (BF16_BITS or F16_BITS) says."""


@overload(weight_to_f32)
def _weight_to_f32_typed(v, kind):
    if isinstance(v, types.Float):
        return lambda v, kind: np.float32(v)

    def bits_to_f32(v, kind):
        if kind == BF16_BITS:
            return bf16_to_f32(v)
        return f16_to_f32(v)

    return bits_to_f32
