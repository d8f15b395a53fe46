"""Rotary position embeddings: frequency tables (transformers' modeling_rope_utils formulas) and their rotation.

Tables are computed in float32 as transformers does (positions * inv_freq, then cos/sin,
times yarn's attention factor); `rotate` applies them in place, in half-rotation layout
(x[i], x[i + hd/2]) or interleaved layout (x[2i], x[2i+1]) as Llama 4 does.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..config import Rope
from . import FLAGS


def inv_freq(rope: Rope, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """(inverse frequencies f32 [hd/2], attention factor) for rope.kind default | llama3 | yarn; head_dim is the
    rotated width (ModelConfig.rotary_dim), as transformers' formulas take it."""
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.float32(rope.theta) ** exponents  # (hd/2,) f32
    freq = (np.float32(1.0) / base).astype(np.float32)
    if rope.kind == "default":
        return freq, 1.0
    if rope.kind == "llama3":
        return _llama3(freq, rope), 1.0
    if rope.kind == "yarn":
        return _yarn(base, rope, dim, max_position_embeddings)
    raise ValueError(f"unknown rope kind {rope.kind!r}")


def _llama3(freq: np.ndarray, rope: Rope) -> np.ndarray:
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = (2 * math.pi / freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, freq / np.float32(rope.factor), freq).astype(np.float32)
    smooth = ((old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(base: np.ndarray, rope: Rope, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    factor = rope.factor
    original = rope.original_max_position_embeddings
    if not factor:
        factor = max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    freq_extra = np.float32(1.0) / base
    freq_inter = np.float32(1.0) / (np.float32(factor) * base)
    freq = freq_inter * (1 - extrapolation) + freq_extra * extrapolation
    return freq.astype(np.float32), float(attention)


def tables(freq: np.ndarray, attention_factor: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin f32 [positions, hd/2], each times the attention factor."""
    angles = np.arange(positions, dtype=np.float32)[:, None] * freq[None, :]
    scale = np.float32(attention_factor)
    return (np.cos(angles) * scale).astype(np.float32), (np.sin(angles) * scale).astype(np.float32)


@njit(**FLAGS)
def rotate(x, pos0, cos, sin, interleaved):
    """Rotate x (T, n, hd) in place; token t sits at position pos0 + t; cos/sin (P, rd/2) rotate each head's
    first rd dims (partial RoPE: rd < hd), the rest pass unchanged."""
    T, n, hd = x.shape
    half = cos.shape[1]
    for t in range(T):
        c = cos[pos0 + t]
        s = sin[pos0 + t]
        for h in range(n):
            for i in range(half):
                if interleaved:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c[i] - b * s[i]
                    x[t, h, 2 * i + 1] = a * s[i] + b * c[i]
                else:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c[i] - b * s[i]
                    x[t, h, i + half] = b * c[i] + a * s[i]
