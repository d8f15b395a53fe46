"""Feed-forward pieces: gated activations, and moving tokens to and from an expert's batch."""

from __future__ import annotations

import numpy as np
from numba import njit

from . import FLAGS
from .expf import exp32


@njit(**FLAGS)
def swiglu(gate_up, out):
    """out (n, F) = silu(gate) * up, gate_up (n, 2F) holding F gate columns then F up columns."""
    n, F = out.shape
    for r in range(n):
        for i in range(F):
            g = gate_up[r, i]
            out[r, i] = g / (np.float32(1.0) + exp32(-g)) * gate_up[r, F + i]


@njit(**FLAGS)
def swiglu_clamped(gate_up, alpha, limit, out):
    """gpt-oss: g = min(gate, limit), u = clamp(up, -limit, limit), out = (u + 1) * g * sigmoid(alpha * g)."""
    n, F = out.shape
    for r in range(n):
        for i in range(F):
            g = min(gate_up[r, i], np.float32(limit))
            u = max(min(gate_up[r, F + i], np.float32(limit)), np.float32(-limit))
            glu = g / (np.float32(1.0) + exp32(-g * np.float32(alpha)))
            out[r, i] = (u + np.float32(1.0)) * glu


@njit(**FLAGS)
def gather(x, order, k, lo, hi, weights, scale_input, out):
    """out[r] = x[t] for the pairs order[lo:hi] (entries t * k + slot), times that pair's weight
    when scale_input (Llama 4 scales the expert's input). x (T, H), weights (T, k), out (>= hi-lo, H)."""
    for r in range(hi - lo):
        pair = order[lo + r]
        t = pair // k
        s = weights[t, pair - t * k] if scale_input else np.float32(1.0)
        for i in range(x.shape[1]):
            out[r, i] = x[t, i] * s


@njit(**FLAGS)
def scatter_add(y, order, k, lo, hi, weights, scale_output, out):
    """out[t] += y[r] for the pairs order[lo:hi], times that pair's weight when scale_output."""
    for r in range(hi - lo):
        pair = order[lo + r]
        t = pair // k
        s = weights[t, pair - t * k] if scale_output else np.float32(1.0)
        for i in range(out.shape[1]):
            out[t, i] += y[r, i] * s
