"""Embedding lookup: the rows of a stored [V, H] matrix for some token ids, as float32, in any encoding."""

from __future__ import annotations

import numpy as np
from numba import njit

from ..layout import CHUNK, Packed
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
def rows_q4(codes, scales, gs, ids, out):
    """codes u8 [V, cols_pad / 2]: in each chunk of 32 columns, byte b holds column b (low nibble) and b + 16."""
    half = CHUNK // 2
    for t in range(ids.shape[0]):
        row = ids[t]
        for i in range(out.shape[1]):
            byte = codes[row, (i // CHUNK) * half + i % half]
            nibble = byte & 15 if i % CHUNK < half else byte >> 4
            out[t, i] = np.float32(np.int32(nibble) - 8) * f16_to_f32(scales[row, i // gs])


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
    elif enc == "q4":
        rows_q4(p.codes, p.scales.view(np.uint16), p.group_size, ids, out)
    else:
        raise ValueError(f"unknown encoding {enc!r}")
    return out
