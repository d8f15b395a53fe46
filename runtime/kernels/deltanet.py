"""Gated DeltaNet (Qwen3.5, Qwen3-Next linear attention): a short causal convolution, then the gated delta rule.

Per value head h a state S (dk, dv) stands in for the KV cache. Each token decays it by exp(g), writes the part
of v it does not yet predict, and reads it with q (Yang et al., "Gated Delta Networks", 2024):

    S = exp(g) S;  S += k (beta (v - S^T k))^T;  out = S^T q * scale

`delta_rule_step` runs exactly that, token by token (decode). `delta_rule_chunked` (prefill) takes CHUNK tokens
at a time in the WY form of transformers' torch_chunk_gated_delta_rule: within a chunk the tokens' corrections
come from one triangular solve, and the state is read and written once per chunk; both end in the same state.
Shapes: T tokens, nk key heads of dk dims, nv value heads of dv dims (head h reads key head h // (nv / nk)),
C convolution channels, K its kernel width.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import FLAGS, PARALLEL
from .expf import exp32
from .simd import flush_denormals, restore_float_mode, row_dots

CHUNK = 64  # transformers' chunk_size
L2_EPS = 1e-6  # transformers' (and the fla library's) l2norm eps


@njit(**FLAGS)
def causal_conv_silu(x, taps, state, out):
    """out (T, C) = silu(depthwise causal convolution of x (T, C) with taps (K, C), C-contiguous).

    state (K-1, C) holds the K-1 inputs before x, oldest first, and afterwards the last K-1 inputs up to x's last.
    Each output sums its taps oldest first; the loops run along channels, so they vectorize.
    """
    T, C = x.shape
    K = taps.shape[0]
    x = np.ascontiguousarray(x)  # a view into the projection's output, as numba types it: copied, the loops vectorize
    acc = np.empty(C, np.float32)
    for t in range(T):
        acc[:] = 0.0
        for j in range(K):  # tap j reads the input K-1-j steps back
            s = t - (K - 1) + j
            if s >= 0:
                for c in range(C):
                    acc[c] += taps[j, c] * x[s, c]
            else:
                for c in range(C):
                    acc[c] += taps[j, c] * state[K - 1 + s, c]
        for c in range(C):
            out[t, c] = acc[c] / (np.float32(1.0) + exp32(-acc[c]))
    keep = max(K - 1 - T, 0)  # older inputs still among the last K-1
    for r in range(keep):
        state[r] = state[r + T]
    for r in range(keep, K - 1):
        state[r] = x[T - (K - 1) + r]


@njit(**FLAGS)
def l2norm(x):
    """x (T, n, d) scaled in place to unit L2 norm per head: x * rsqrt(sum(x^2) + 1e-6)."""
    T, n, d = x.shape
    for t in range(T):
        for h in range(n):
            ss = np.float32(0.0)
            for i in range(d):
                ss += x[t, h, i] * x[t, h, i]
            r = np.float32(1.0) / np.sqrt(ss + np.float32(L2_EPS))
            for i in range(d):
                x[t, h, i] *= r


@njit(**FLAGS)
def gates(a, b, a_log, dt_bias, g, beta):
    """g (T, nv) = -exp(a_log) * softplus(a + dt_bias), the log decay; beta (T, nv) = sigmoid(b), the write rate."""
    T, nv = a.shape
    for t in range(T):
        for h in range(nv):
            x = a[t, h] + dt_bias[h]
            softplus = x if x > np.float32(20.0) else np.log1p(np.exp(x))  # torch's threshold
            g[t, h] = -np.exp(a_log[h]) * softplus
            beta[t, h] = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[t, h]))


@njit(**PARALLEL)
def delta_rule_step(q, k, v, g, beta, scale, state, out):
    """The gated delta rule one token after another: q, k (T, nk, dk) L2-normalized, v (T, nv, dv), g and beta
    (T, nv); state (nv, dk, dv) updated in place; out (T, nv, dv)."""
    T, nk, dk = k.shape
    nv, dv = v.shape[1], v.shape[2]
    group = nv // nk
    for h in prange(nv):
        kh = h // group
        S = state[h]
        memory = np.empty(dv, np.float32)
        for t in range(T):
            decay = np.exp(g[t, h])
            memory[:] = 0.0
            for i in range(dk):
                for j in range(dv):
                    S[i, j] *= decay
                    memory[j] += S[i, j] * k[t, kh, i]
            for j in range(dv):
                memory[j] = (v[t, h, j] - memory[j]) * beta[t, h]  # the correction written
            for j in range(dv):
                out[t, h, j] = 0.0
            for i in range(dk):
                qi = q[t, kh, i] * np.float32(scale)
                for j in range(dv):
                    S[i, j] += k[t, kh, i] * memory[j]
                    out[t, h, j] += S[i, j] * qi


@njit(**PARALLEL)
def delta_rule_chunked(q, k, v, g, beta, scale, state, out):
    """delta_rule_step's result and state, CHUNK tokens at a time (same arguments)."""
    T, nk, dk = k.shape
    nv, dv = v.shape[1], v.shape[2]
    group = nv // nk
    for h in prange(nv):
        # A fast-forgetting head's decays within a chunk reach exp(-90) and less: the products they scale fall
        # below float32's normal range, and on the CPU's slow path for denormals prefill ran 3.5x slower.
        mode = flush_denormals()
        kh = h // group
        S = state[h]
        cum = np.empty(CHUNK, np.float32)
        lower = np.zeros((CHUNK, CHUNK), np.float32)  # beta_i k_i . k_j exp(cum_i - cum_j), j < i
        u = np.empty((CHUNK, dv), np.float32)  # the solved values, then the new values
        w = np.empty((CHUNK, dk), np.float32)  # the solved keys that read the old state
        dots = np.empty(CHUNK, np.float32)
        kc = np.empty((CHUNK, dk), np.float32)  # the chunk's keys and queries, contiguous for simd's dot products
        qc = np.empty((CHUNK, dk), np.float32)
        for c0 in range(0, T, CHUNK):
            n = min(CHUNK, T - c0)
            for i in range(n):
                for d in range(dk):
                    kc[i, d] = k[c0 + i, kh, d]
                    qc[i, d] = q[c0 + i, kh, d]
            total = np.float32(0.0)
            for i in range(n):
                total += g[c0 + i, h]
                cum[i] = total
            # (I + lower) u = beta v and (I + lower) w = beta k exp(cum), by forward substitution
            for i in range(n):
                t = c0 + i
                bi = beta[t, h]
                row_dots(kc[i], kc, 0, i, dots)
                for j in range(i):
                    lower[i, j] = bi * dots[j] * np.exp(cum[i] - cum[j])
                for d in range(dv):
                    u[i, d] = v[t, h, d] * bi
                ei = np.exp(cum[i])
                for d in range(dk):
                    w[i, d] = kc[i, d] * bi * ei
                for j in range(i):
                    lij = lower[i, j]
                    for d in range(dv):
                        u[i, d] -= lij * u[j, d]
                    for d in range(dk):
                        w[i, d] -= lij * w[j, d]
            # new values: what the old state does not predict
            for i in range(n):
                for d in range(dk):
                    wid = w[i, d]
                    for e in range(dv):
                        u[i, e] -= wid * S[d, e]
            for i in range(n):
                t = c0 + i
                ei = np.exp(cum[i])
                row_dots(qc[i], kc, 0, i + 1, dots)
                for j in range(i + 1):
                    dots[j] *= np.exp(cum[i] - cum[j])
                for e in range(dv):
                    out[t, h, e] = 0.0
                for d in range(dk):
                    qd = qc[i, d] * ei
                    for e in range(dv):
                        out[t, h, e] += qd * S[d, e]
                for j in range(i + 1):
                    for e in range(dv):
                        out[t, h, e] += dots[j] * u[j, e]
                for e in range(dv):
                    out[t, h, e] *= np.float32(scale)
            last = cum[n - 1]
            decay = np.exp(last)
            for d in range(dk):
                for e in range(dv):
                    S[d, e] *= decay
            for j in range(n):
                ej = np.exp(last - cum[j])
                for d in range(dk):
                    kd = kc[j, d] * ej
                    for e in range(dv):
                        S[d, e] += kd * u[j, e]
        restore_float_mode(mode)


@njit(**FLAGS)
def silu_gate(x, z):
    """x (T, n, d) *= silu(z), z (T, n, d): the gate on the normalized output."""
    T, n, d = x.shape
    # z is a view into the projection's output, whose rows numba cannot type as contiguous: each row is copied
    # first, so the loop below vectorizes (3x faster for Qwen3.5's 256 tokens x 32 heads x 128).
    zt = np.empty(d, np.float32)
    for t in range(T):
        for h in range(n):
            zt[:] = z[t, h]
            for i in range(d):
                x[t, h, i] *= zt[i] / (np.float32(1.0) + exp32(-zt[i]))
