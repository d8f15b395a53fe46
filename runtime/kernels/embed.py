"""Embedding lookup: the rows of a stored [V, H] matrix for some token ids, as float32, in any encoding."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..layout import CHUNK, QUANT_BITS, Packed
from . import FLAGS
from .bits import bf16_to_f32, f16_to_f32
from .qmatmul import group_scale, q5_bit


@njit(**FLAGS)
def rows_f32(w, ids, out):
    for t in range(ids.shape[0]):
        out[t, :] = w[ids[t], : out.shape[1]]


@njit(**FLAGS)
def rows_bf16(w, ids, out):
    """w u16 [V, H] (bfloat16 bits)."""
    for t in range(ids.shape[0]):
        for i in range(out.shape[1]):
            out[t, i] = bf16_to_f32(w[ids[t], i])


@njit(**FLAGS)
def rows_f16(w, ids, out):
    """w u16 [V, H] (float16 bits)."""
    for t in range(ids.shape[0]):
        for i in range(out.shape[1]):
            out[t, i] = f16_to_f32(w[ids[t], i])


@njit(**FLAGS)
def rows_quant(codes, scales, supers, gs, ids, out, bits):
    """Quantized rows (layout's q4 / q5 / q6 / q8, two-level scales). q8 codes are int8; q4-q6 codes u8 [V, cols_pad *
    bits / 8]: in each chunk of 32 columns, byte b of the nibbles holds column b (low nibble) and b + 16, q5 and
    q6 rows then hold the high bits."""
    half = CHUNK // 2
    offset = np.int32(0 if bits == 8 else 1 << (bits - 1))
    high_at = codes.shape[1] * 4 // bits
    for t in range(ids.shape[0]):
        row = ids[t]
        for i in range(out.shape[1]):
            if bits == 8:
                c = np.int32(codes[row, i])
            else:
                chunk, j = i // CHUNK, i % CHUNK
                byte = np.int32(codes[row, chunk * half + j % half])
                c = byte & 15 if j < half else byte >> 4
                if bits == 5:
                    at = q5_bit(j)
                    c |= ((np.int32(codes[row, high_at + chunk * 4 + at // 8]) >> (at % 8)) & 1) << 4
                elif bits == 6:
                    c |= ((np.int32(codes[row, high_at + chunk * 8 + j % 8]) >> (2 * (j // 8))) & 3) << 4
            out[t, i] = np.float32(c - offset) * group_scale(scales[row], supers[row], i // gs)


def embed(p: Packed, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out f32 [T, H] = rows ids (T,) int64 of the packed matrix p [V, H]."""
    enc = p.encoding
    if enc == "f32":
        rows_f32(p.codes, ids, out)
    elif enc == "bf16":
        rows_bf16(p.codes, ids, out)
    elif enc == "f16":
        rows_f16(p.codes.view(np.uint16), ids, out)
    elif enc in QUANT_BITS:
        rows_quant(p.codes, p.scales, p.supers, p.group_size, ids, out, QUANT_BITS[enc])
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    return out
