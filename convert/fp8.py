"""FP8 block-scaled weights, as DeepSeek-V3/R1, Qwen3 and GLM-4.5 publish them (config.json's quantization_config
`{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}`): a quantized matrix `X` [..., R, C] is
stored as F8_E4M3 codes (float8_e4m3fn: sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities, S.1111.111
is NaN) beside `X_scale_inv` [..., ceil(R / b0), ceil(C / b1)] (F32 or BF16), one scale per block of [b0, b1]:
the value is code's value x scale_inv. A matrix without that companion is stored as it is (embeddings, heads,
routers, norms)."""

from __future__ import annotations

import math

import numpy as np

from ..runtime.errors import MoeError

DTYPE = "F8_E4M3"  # the safetensors dtype of the codes
SCALE_SUFFIX = "_scale_inv"  # X.weight's scales are X.weight_scale_inv
SCALE_DTYPES = ("F32", "BF16")


def _e4m3(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = code >> 3 & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:  # subnormal
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


E4M3_VALUES = np.array([_e4m3(c) for c in range(256)], dtype=np.float32)  # exact: at most 4 significant bits


def block_size(hf: dict, config_json) -> tuple[int, int]:
    """The [rows, cols] of the blocks that share a scale, from the quantization_config of config.json `hf` (at its
    top level, or in its text_config); a MoeError naming `config_json` when it does not describe e4m3 FP8 blocks."""
    q = hf.get("quantization_config") or (hf.get("text_config") or {}).get("quantization_config")
    if not isinstance(q, dict):
        raise MoeError(f"{config_json}: the weights are FP8 ({DTYPE} with *{SCALE_SUFFIX} scales) but there is no "
                       "quantization_config; re-download config.json")
    if q.get("quant_method") != "fp8":
        raise MoeError(f"{config_json}: quantization_config has quant_method {q.get('quant_method')!r} but the weights "
                       f"are FP8; moe converts FP8 block-scaled checkpoints (quant_method \"fp8\")")
    fmt = q.get("fmt", "e4m3")  # transformers assumes e4m3 when the key is absent
    if fmt != "e4m3":
        raise MoeError(f"{config_json}: FP8 format {fmt!r}; moe converts e4m3 (float8_e4m3fn) weights only")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise MoeError(f"{config_json}: weight_block_size {block!r}; moe converts FP8 weights scaled per block of "
                       "[rows, cols] (two positive integers, such as [128, 128])")
    return block[0], block[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The shape of the scales of a weight of `shape` [..., R, C] (leading dims, such as experts, kept)."""
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize(codes: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], row0: int = 0) -> np.ndarray:
    """Rows row0.. of a weight: codes (n, C) uint8 -> float32 (n, C), each code's value times its block's scale
    (scale_inv: the whole weight's, float32 (ceil(R / b0), ceil(C / b1)))."""
    n, cols = codes.shape
    values = E4M3_VALUES[codes]  # (n, C)
    scales = scale_inv[np.arange(row0, row0 + n) // block[0]]  # (n, ceil(C / b1))
    whole = cols // block[1]
    split = values[:, :whole * block[1]].reshape(n, whole, block[1])  # a view: splitting the last axis never copies
    split *= scales[:, :whole, None]
    if whole * block[1] < cols:  # the ragged last block of columns
        values[:, whole * block[1]:] *= scales[:, whole:]
    return values


def nan_codes(codes: np.ndarray) -> int:
    """How many of `codes` are NaN (S.1111.111)."""
    return int(np.count_nonzero((codes & 0x7F) == 0x7F))
