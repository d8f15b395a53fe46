"""A float32 exp that LLVM can vectorize (numba's math.exp is a scalar libm call without SVML)."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import FASTMATH
from .bits import u32_as_f32

# Cephes' expf: exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial (< 2 ulp).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_MIN = np.float32(-87.0)  # exp(-87) ~ 1.6e-38 stands in for anything smaller (2^n stays normal)
_MAX = np.float32(88.0)  # exp(88) ~ 1.7e38 stands in for anything larger (no inf)
_P = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3),
      np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def exp32(x):
    """exp(x) for float32 x, clamped to [exp(-87), exp(88)] (so exp(-inf) ~ 1.6e-38, never 0 or inf)."""
    x = min(max(x, _MIN), _MAX)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _P[0]
    p = p * r + _P[1]
    p = p * r + _P[2]
    p = p * r + _P[3]
    p = p * r + _P[4]
    p = p * r + _P[5]
    y = p * r * r + r + np.float32(1.0)
    return y * u32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))
