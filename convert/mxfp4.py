"""MXFP4, as gpt-oss checkpoints on the Hub store their experts: FP4 (E2M1) codes, two per byte (low
nibble first), 32 per block sharing one power-of-two scale 2^(s - 127)."""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks (..., G, 16) uint8, scales (..., G) uint8 -> float32 (..., G * 32)."""
    values = np.empty((*blocks.shape[:-1], 32), np.float32)  # (..., G, 32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    values *= np.ldexp(np.float32(1.0), scales.astype(np.int32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def decode_bf16(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """decode() as bfloat16 words (uint16): exact, since an FP4 value has at most two significant bits."""
    return (decode(blocks, scales).view(np.uint32) >> 16).astype(np.uint16)
