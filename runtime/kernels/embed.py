"""Embedding lookup: the rows of a stored [V, H] matrix for some token ids, as float32, in any encoding."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..layout import CHUNK, QUANT_BITS, Packed
from . import FLAGS
from .bits import bf16_to_f32, f16_to_f32


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
def rows_q8(codes, scales, gs, ids, out):
    """codes i8 [V, cols_pad], scales u16 [V, cols_pad / gs] (float16 bits)."""
    for t in range(ids.shape[0]):
        row = ids[t]
        for i in range(out.shape[1]):
            out[t, i] = np.float32(codes[row, i]) * f16_to_f32(scales[row, i // gs])


@njit(**FLAGS)
def rows_packed(codes, scales, gs, ids, out, bits):
    """codes u8 [V, cols_pad * bits / 8] in the layout's q4 / q5 / q6 order: in each chunk of 32 columns, byte b
    of the nibbles holds column b (low nibble) and b + 16; q5 and q6 rows then hold the high bits."""
    half = CHUNK // 2
    offset = np.int32(1 << (bits - 1))
    high_at = codes.shape[1] * 4 // bits
    for t in range(ids.shape[0]):
        row = ids[t]
        for i in range(out.shape[1]):
            chunk, j = i // CHUNK, i % CHUNK
            byte = np.int32(codes[row, chunk * half + j % half])
            c = byte & 15 if j < half else byte >> 4
            if bits == 5:
                c |= ((np.int32(codes[row, high_at + i // 8]) >> (i % 8)) & 1) << 4
            elif bits == 6:
                c |= ((np.int32(codes[row, high_at + chunk * 8 + j % 8]) >> (2 * (j // 8))) & 3) << 4
            out[t, i] = np.float32(c - offset) * f16_to_f32(scales[row, i // gs])


def embed(p: Packed, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out f32 [T, H] = rows ids (T,) int64 of the packed matrix p [V, H]."""
    enc = p.encoding
    if enc == "f32":
        rows_f32(p.codes, ids, out)
    elif enc == "bf16":
        rows_bf16(p.codes, ids, out)
    elif enc == "f16":
        rows_f16(p.codes.view(np.uint16), ids, out)
    elif enc == "q8":
        rows_q8(p.codes, p.scales.view(np.uint16), p.group_size, ids, out)
    elif enc in QUANT_BITS:
        rows_packed(p.codes, p.scales.view(np.uint16), p.group_size, ids, out, QUANT_BITS[enc])
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    return out
