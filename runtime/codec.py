"""The layout's encodings in numpy: packing codes into q4 / q5 / q6 rows, unpacking them, and the float32 values a
packed tensor stands for (the slow, obvious reference the kernels are tested against). The bit orders are
specified in moe.runtime.layout's docstring."""

from __future__ import annotations

import numpy as np

from .layout import CHUNK, QUANT_BITS, SUPER, Packed


def group_scales(p: Packed) -> np.ndarray:
    """float32 [rows, groups]: each group's scale, k * (D / 127), in the kernels' arithmetic."""
    step = (np.asarray(p.supers, np.uint16).astype(np.uint32) << 16).view(np.float32) * np.float32(1.0 / 127.0)
    groups = p.scales.shape[1]
    return np.asarray(p.scales, np.int8).astype(np.float32) * np.repeat(step, SUPER, axis=1)[:, :groups]


def pack_q4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [rows, cols_pad] -> nibbles [rows, cols_pad / 2] in the layout's chunk order."""
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // CHUNK, 2, CHUNK // 2).astype(np.uint8)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(rows, cols // 2)


def unpack_q4(nibbles: np.ndarray) -> np.ndarray:
    """Inverse of pack_q4: uint8 codes 0..15 [rows, cols_pad]."""
    rows, half = nibbles.shape
    n = nibbles.reshape(rows, half // (CHUNK // 2), 1, CHUNK // 2)
    return np.concatenate([n & 0x0F, n >> 4], axis=2).reshape(rows, half * 2)


def q5_bit(j: int) -> int:
    """The bit of a q5 chunk's uint32 that holds the high bit of its column j (see moe.runtime.layout)."""
    return 8 * (j % 4) + (j % 16) // 4 + (4 if j < 16 else 0)


_Q5_BITS = np.array([q5_bit(j) for j in range(CHUNK)], np.uint32)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes 0 .. 2**bits - 1 [rows, cols_pad] -> the layout's q4 / q5 / q6 rows."""
    rows, cols = codes.shape
    codes = codes.astype(np.uint8)
    nibbles = pack_q4(codes & 0x0F)
    if bits == 4:
        return nibbles
    high = (codes >> 4).reshape(rows, cols // CHUNK, 4, 8)
    if bits == 5:
        words = (high.reshape(rows, cols // CHUNK, CHUNK).astype(np.uint32) << _Q5_BITS).sum(axis=2, dtype=np.uint32)
        planes = words.astype("<u4").view(np.uint8)
    else:
        planes = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return np.concatenate([nibbles, planes.reshape(rows, -1)], axis=1)


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 codes [rows, cols_pad]."""
    rows, width = packed.shape
    cols = width * 8 // bits
    low = unpack_q4(np.ascontiguousarray(packed[:, : cols // 2]))
    if bits == 4:
        return low
    planes = packed[:, cols // 2:].reshape(rows, cols // CHUNK, -1)
    if bits == 5:
        words = np.ascontiguousarray(planes).view("<u4")  # [rows, chunks, 1]
        high = (words >> _Q5_BITS) & 1
    else:
        high = np.stack([(planes >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    return low | (high.reshape(rows, cols) << 4).astype(np.uint8)


def dequantize(p: Packed) -> np.ndarray:
    """The float32 values a packed tensor stands for (the slow, obvious reference)."""
    if p.encoding == "f32":
        return np.asarray(p.codes, dtype=np.float32).reshape(p.shape)
    if p.encoding == "bf16":
        return (np.asarray(p.codes, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(p.shape)
    if p.encoding == "f16":
        return np.asarray(p.codes, dtype=np.float16).astype(np.float32).reshape(p.shape)
    rows, cols = p.shape
    bits = QUANT_BITS[p.encoding]
    if bits == 8:
        q = np.asarray(p.codes, dtype=np.int8).astype(np.float32)
    else:
        q = unpack_codes(np.asarray(p.codes), bits).astype(np.float32) - 2.0 ** (bits - 1)
    s = np.repeat(group_scales(p), p.group_size, axis=1)
    return (q * s)[:, :cols]


