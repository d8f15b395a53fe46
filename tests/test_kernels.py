"""Each kernel against a slow, obvious numpy twin (and the RoPE tables against transformers itself)."""

from __future__ import annotations

import numpy as np
import pytest
from moe.convert.quant import quantize
from moe.runtime.codec import dequantize
from moe.runtime.config import Rope
from moe.runtime.kernels import FLAGS, rope
from moe.runtime.kernels.attention import _attend, attend, cache_rows, per_head, temperature
from moe.runtime.kernels.embed import embed
from moe.runtime.kernels.expf import exp32
from moe.runtime.kernels.ffn import gather, scatter_add, swiglu, swiglu_clamped
from moe.runtime.kernels.norms import rmsnorm
from moe.runtime.kernels.routing import (
    group_by_expert,
    sigmoid_group_topk,
    sigmoid_topk,
    softmax_group_topk,
    softmax_topk,
    topk_softmax,
)
from moe.runtime.kernels.simd import LANES, axpy_rows, dot1, dot4, lane_sum
from moe.runtime.layout import QUANT_BITS, Packed
from numba import njit

rng = np.random.default_rng(0)


def randn(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# -- float sums in a written order ----------------------------------------------------------------

@njit
def float_sums(a, x0, x1, x2, x3):
    return dot1(a, x0), dot4(a, x0, x1, x2, x3), lane_sum(a)


def lane_order(a, x, fused: bool):
    """simd's order in numpy: column c in lane c % LANES (multiply-adds, fused or not), lanes folded in halves,
    the last columns added one by one."""
    a64, x64 = a.astype(np.float64), x.astype(np.float64)
    lanes = np.zeros(LANES, np.float32)
    whole = len(a) - len(a) % LANES
    for c0 in range(0, whole, LANES):
        prod = a64[c0: c0 + LANES] * x64[c0: c0 + LANES]  # exact: float32 products fit float64
        lanes = ((prod + lanes).astype(np.float32) if fused
                 else prod.astype(np.float32) + lanes)
    width = LANES // 2
    while width:
        lanes = lanes[:width] + lanes[width: 2 * width]
        width //= 2
    total = lanes[0]
    for c in range(whole, len(a)):
        total = np.float32(a64[c] * x64[c] + total) if fused else np.float32(a[c] * x[c]) + total
    return total


def bits(v) -> int:
    """The float32 bits of v (numba returns float32 results as Python floats)."""
    return int(np.float32(v).view(np.uint32))


@pytest.mark.parametrize("n", [0, 7, 16, 40, 2048])
def test_float_sums_in_their_written_order(n):
    a, *xs = (randn(n) for _ in range(5))
    one, four, total = float_sums(a, *xs)
    assert bits(one) == bits(four[0])  # each x's sum the same bits from dot1 and dot4
    for x, got in zip(xs, four, strict=True):
        assert bits(got) in {bits(lane_order(a, x, fused)) for fused in (True, False)}
        assert abs(got - a.astype(np.float64) @ x) <= 1e-5 * max(1.0, np.abs(a) @ np.abs(x))
    assert bits(total) == bits(lane_order(a, np.ones(n, np.float32), False))
    bf16 = (a.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits read as their values
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    assert bits(float_sums(bf16, *xs)[0]) == bits(float_sums(widened, *xs)[0])
    codes = np.clip(np.rint(a * 40), -127, 127).astype(np.int8)  # int8 codes (the q8 KV cache) read as their values
    assert bits(float_sums(codes, *xs)[0]) == bits(float_sums(codes.astype(np.float32), *xs)[0])


@njit(**FLAGS)
def axpy_loop(acc, w, rows, start, n):
    """axpy_rows as a plain loop, compiled with the kernels' flags."""
    for j in range(n):
        for c in range(acc.shape[0]):
            acc[c] += w[j] * np.float32(rows[start + j, c])


@njit
def axpy_call(acc, w, rows, start, n):
    axpy_rows(acc, w, rows, start, n)


@pytest.mark.parametrize("width", [4, 8, 20, 64, 72, 130, 576])
@pytest.mark.parametrize("n", [0, 1, 64])
def test_axpy_rows_has_the_bits_of_the_plain_loop(width, n):
    rows, w, acc = randn(80, width), randn(70), randn(width)
    want = acc.copy()
    axpy_loop(want, w, rows, 5, n)
    got = acc.copy()
    axpy_call(got, w, rows, 5, n)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    exact = acc.astype(np.float64) + w[:n].astype(np.float64) @ rows[5: 5 + n].astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5)
    bf16 = (rows.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bits read as their values
    widened = (bf16.astype(np.uint32) << 16).view(np.float32)
    from_bits, from_values = acc.copy(), acc.copy()
    axpy_call(from_bits, w, bf16, 5, n)
    axpy_call(from_values, w, widened, 5, n)
    np.testing.assert_array_equal(from_bits.view(np.uint32), from_values.view(np.uint32))
    codes = np.clip(np.rint(rows * 40), -127, 127).astype(np.int8)  # int8 codes (the q8 KV cache)
    from_codes, from_values = acc.copy(), acc.copy()
    axpy_call(from_codes, w, codes, 5, n)
    axpy_call(from_values, w, codes.astype(np.float32), 5, n)
    np.testing.assert_array_equal(from_codes.view(np.uint32), from_values.view(np.uint32))


# -- exp -----------------------------------------------------------------------------------------

@njit
def exp_all(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


def test_exp32():
    x = np.concatenate([np.linspace(-87, 88, 400_001), [0.0, -np.inf, np.inf, -1e4, 1e4]]).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    inside = slice(0, -5)
    np.testing.assert_allclose(out[inside], np.exp(x[inside].astype(np.float64)), rtol=2e-7)
    assert out[-5] == 1.0
    assert 0 < out[-4] == out[-2] < 2e-38 and np.isfinite(out[-3]) and out[-3] == out[-1]


# -- norms -----------------------------------------------------------------------------------------

def naive_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("shape", [(1, 1, 64), (5, 4, 24), (3, 1, 96)])
def test_rmsnorm(shape):
    x, w = randn(*shape), randn(shape[-1])
    out = np.empty_like(x)
    rmsnorm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, naive_rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    rmsnorm(x, w, 1e-5, x)  # in place
    np.testing.assert_allclose(x, out, rtol=1e-6)


# -- rope ------------------------------------------------------------------------------------------

def transformers_inv_freq(rope_parameters: dict, head_dim: int, max_pos: int):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    kind = rope_parameters["rope_type"]
    if kind == "default":
        theta = rope_parameters["rope_theta"]
        import torch

        return (1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))).numpy(), 1.0
    freq, factor = ROPE_INIT_FUNCTIONS[kind](config)
    return freq.numpy(), factor


ROPES = [
    ({"rope_type": "default", "rope_theta": 1e6}, Rope("default", 1e6)),
    ({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64},
     Rope("llama3", 5e5, True, 8.0, 1.0, 4.0, 64)),
    ({"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
      "truncate": False, "original_max_position_embeddings": 4096},
     Rope("yarn", 150000.0, factor=32.0, original_max_position_embeddings=4096, truncate=False)),
    ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 2048,
      "mscale": 1.0, "mscale_all_dim": 0.5},
     Rope("yarn", 10000.0, factor=4.0, original_max_position_embeddings=2048, mscale=1.0, mscale_all_dim=0.5)),
]


@pytest.mark.parametrize("hd", [24, 64])
@pytest.mark.parametrize("params,ours", ROPES, ids=["default", "llama3", "yarn", "yarn-mscale"])
def test_rope_frequencies_match_transformers(params, ours, hd):
    want, want_factor = transformers_inv_freq(params, hd, 131072)
    got, factor = rope.inv_freq(ours, hd, 131072)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert factor == pytest.approx(want_factor, rel=1e-12)


def naive_rotate(x, pos0, cos, sin, interleaved):
    """The first rd = 2 * cos.shape[1] dims of each head rotated, the rest unchanged."""
    T = x.shape[0]
    rd = 2 * cos.shape[1]
    c, s = cos[pos0: pos0 + T, None, :], sin[pos0: pos0 + T, None, :]
    head, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        z = (head[..., 0::2] + 1j * head[..., 1::2]) * (c + 1j * s)
        return np.concatenate([np.stack([z.real, z.imag], axis=-1).reshape(head.shape), rest], axis=-1)
    a, b = head[..., : rd // 2], head[..., rd // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s, rest], axis=-1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate(interleaved):
    cos, sin = rope.tables(*rope.inv_freq(Rope("default", 1e4), 16, 4096), 40)
    x = randn(6, 3, 16)
    want = naive_rotate(x, 7, cos, sin, interleaved)
    rope.rotate(x, 7, cos, sin, interleaved)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)


def test_rotate_partial():
    """GLM-4.5: tables for 8 of 16 dims rotate those (in halves of 4), the last 8 pass unchanged."""
    cos, sin = rope.tables(*rope.inv_freq(Rope("default", 1e4), 8, 4096), 40)
    x = np.random.default_rng(1).standard_normal((6, 3, 16)).astype(np.float32)
    want = naive_rotate(x, 7, cos, sin, False)
    rope.rotate(x, 7, cos, sin, False)
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(x[..., 8:], want[..., 8:])


def test_tables_scale_by_attention_factor():
    freq = np.array([1.0, 0.1], np.float32)
    cos, sin = rope.tables(freq, 2.0, 3)
    np.testing.assert_allclose(cos[2], 2 * np.cos([2.0, 0.2]), rtol=1e-6)
    np.testing.assert_allclose(sin[2], 2 * np.sin([2.0, 0.2]), rtol=1e-6)


# -- attention -------------------------------------------------------------------------------------

def naive_attend(q, k, v, pos0, scale, window, chunk, sinks):
    """q (T, nh, hd); k, v (nkv, P, hd) holding positions 0 .. pos0+T-1."""
    T, nh, hd = q.shape
    group = nh // k.shape[0]
    n = pos0 + T
    i = np.arange(pos0, n)[:, None]
    j = np.arange(n)[None, :]
    allowed = j <= i
    if window:
        allowed &= i - j < window
    if chunk:
        allowed &= i // chunk == j // chunk
    out = np.zeros_like(q, dtype=np.float64)
    for h in range(nh):
        kh, vh = k[h // group, :n].astype(np.float64), v[h // group, :n].astype(np.float64)
        scores = np.where(allowed, q[:, h].astype(np.float64) @ kh.T * scale, -np.inf)
        if sinks is not None:
            scores = np.concatenate([scores, np.full((T, 1), sinks[h])], axis=1)
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[:, h] = p[:, :n] @ vh
    return out


def test_attend_refuses_caches_that_disagree_with_q_instead_of_reading_out_of_bounds():
    q, out, sinks = randn(3, 4, 16), np.empty((3, 4, 16), np.float32), np.zeros(4, np.float32)
    good = randn(2, 8, 16)
    for k, v, pos0, o in [(randn(2, 8, 12), randn(2, 8, 12), 0, out),  # head size
                          (good, randn(2, 8, 12), 0, out),  # values unlike keys
                          (good, good, 6, out),  # positions past the cache
                          (randn(3, 8, 16), randn(3, 8, 16), 0, out),  # 4 heads over 3 kv heads
                          (good, good, 0, np.empty((3, 4, 8), np.float32))]:
        with pytest.raises(ValueError, match="attend: "):
            attend(q, k, v, pos0, 0.25, 0, 0, sinks, False, o)


@pytest.mark.parametrize("pos0,T", [(0, 20), (13, 1), (5, 9)])
@pytest.mark.parametrize("window,chunk,with_sinks", [(0, 0, False), (6, 0, True), (0, 8, False), (0, 0, True)])
def test_attend(pos0, T, window, chunk, with_sinks):
    nh, nkv, hd, P = 6, 2, 16, 32
    q = randn(T, nh, hd)
    k, v = randn(nkv, P, hd), randn(nkv, P, hd)
    sinks = randn(nh) if with_sinks else None
    out = np.zeros_like(q)
    attend(q, k, v, pos0, hd**-0.5, window, chunk, np.zeros(nh, np.float32) if sinks is None else sinks,
           sinks is not None, out)
    np.testing.assert_allclose(out, naive_attend(q, k, v, pos0, hd**-0.5, window, chunk, sinks), rtol=1e-4, atol=1e-5)


def q8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (nkv, P, hd) as a q8 cache holds it, in numpy: int8 codes and each row's scale."""
    top = np.abs(x).max(axis=2)
    inv = np.divide(np.float32(127), top, out=np.zeros_like(top), where=top > 0)
    return np.rint(x * inv[..., None]).clip(-127, 127).astype(np.int8), top / np.float32(127)


@pytest.mark.parametrize("T,nkv", [(1, 1), (3, 1), (1, 2)])
@pytest.mark.parametrize("q8", [False, True])
def test_attend_in_parts_keeps_the_bits(T, nkv, q8):
    """Query heads split across threads (decode; latent attention's one kv head): each head's sums as when whole."""
    nh, hd, pos0 = 7 * nkv, 24, 150  # 7 heads a kv head: parts of 3 leave one of 1
    q, k, v, sinks = randn(T, nh, hd), randn(nkv, pos0 + T, hd), randn(nkv, pos0 + T, hd), randn(nh)
    ks = vs = np.zeros((nkv, 0), np.float32)
    if q8:
        (k, ks), (v, vs) = q8_rows(k), q8_rows(v)
    want = naive_attend(q, k * ks[..., None], v * vs[..., None], pos0, hd**-0.5, 0, 0, sinks) if q8 else \
        naive_attend(q, k, v, pos0, hd**-0.5, 0, 0, sinks)
    whole = np.zeros_like(q)
    _attend(q, k, v, ks, vs, pos0, hd**-0.5, 0, 0, sinks, True, 7, whole)
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-5)
    for size in (1, 2, 3, 6):
        parts = np.zeros_like(q)
        _attend(q, k, v, ks, vs, pos0, hd**-0.5, 0, 0, sinks, True, size, parts)
        np.testing.assert_array_equal(parts, whole, err_msg=f"parts of {size}")


def test_q8_cache_rounds_each_row_to_its_own_scale_and_attends_as_its_values():
    """A q8 KV cache holds int8 codes x / s rounded to nearest, s = max |x| / 127 for each row (a row of zeros: codes
    and scale 0), and attention over it is attention over codes * s; its error stays within a row's half step."""
    T, nkv, hd, P, nh = 5, 2, 16, 12, 4
    k, v = randn(T, nkv, hd) * 3, randn(T, nkv, hd)
    k[2, 1] = 0.0
    k8, v8 = np.zeros((nkv, P, hd), np.int8), np.zeros((nkv, P, hd), np.int8)
    ks, vs = np.zeros((nkv, P), np.float32), np.zeros((nkv, P), np.float32)
    for codes, scales, x in ((k8, ks, k), (v8, vs, v)):
        cache_rows(x, codes, 3, scales)
        want_codes, want_scales = q8_rows(x.transpose(1, 0, 2))
        np.testing.assert_array_equal(codes[:, 3:8], want_codes)
        np.testing.assert_array_equal(scales[:, 3:8], want_scales)
        assert np.all(np.abs(codes[:, 3:8]).max(axis=2)[want_scales > 0] == 127)
        got = codes[:, 3:8] * scales[:, 3:8, None]
        assert np.all(np.abs(got - x.transpose(1, 0, 2)) <= scales[:, 3:8, None] * 0.5 * (1 + 1e-5))
    assert not k8[1, 5].any() and ks[1, 5] == 0
    q = randn(2, nh, hd)
    out = np.zeros_like(q)
    attend(q, k8, v8, 6, hd**-0.5, 0, 0, np.zeros(nh, np.float32), False, out, ks, vs)
    want = naive_attend(q, k8 * ks[..., None], v8 * vs[..., None], 6, hd**-0.5, 0, 0, None)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="attend: the rows' scales"):
        attend(q, k8, v8, 6, hd**-0.5, 0, 0, np.zeros(nh, np.float32), False, out, ks[:, :8], vs)
    for codes, scales in ((k8, None), (k8.astype(np.float32), ks)):  # codes read as values; values scaled again
        with pytest.raises(ValueError, match="attend: int8 caches, and only they"):
            attend(q, codes, codes, 6, hd**-0.5, 0, 0, np.zeros(nh, np.float32), False, out, scales, scales)
    with pytest.raises(ValueError, match="cache_rows: an int8 cache needs"):
        cache_rows(k, k8, 3)


def bf16_nearest(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even) as float32, in numpy."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return (((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def test_bfloat16_cache_rounds_to_nearest_and_attends_as_its_values():
    """A quantized model's KV cache holds bfloat16 bits: rows written rounded to nearest (ties to even, exactly at
    a tie too), and attention over them equals attention over a float32 cache holding the same values."""
    T, nkv, hd, P, nh = 5, 2, 16, 12, 4
    k, v = randn(T, nkv, hd) * 3, randn(T, nkv, hd)
    k[0, 0, :4] = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20], np.float32)  # ties, and past
    k16, v16 = np.zeros((nkv, P, hd), np.uint16), np.zeros((nkv, P, hd), np.uint16)
    k32, v32 = np.zeros((nkv, P, hd), np.float32), np.zeros((nkv, P, hd), np.float32)
    for cache16, cache32, x in ((k16, k32, k), (v16, v32, v)):
        cache_rows(x, cache16, 3)
        cache_rows(bf16_nearest(x), cache32, 3)
        np.testing.assert_array_equal((cache16.astype(np.uint32) << 16).view(np.float32), cache32)
    assert list((k16[0, 3, :4].astype(np.uint32) << 16).view(np.float32)) == [1.0, 1 + 4 * 2**-8, -1.0, 1 + 2**-7]
    q = randn(2, nh, hd)
    out16, out32 = np.zeros_like(q), np.zeros_like(q)
    for kc, vc, out in ((k16, v16, out16), (k32, v32, out32)):
        attend(q, kc, vc, 6, hd**-0.5, 0, 0, np.zeros(nh, np.float32), False, out)
    np.testing.assert_array_equal(out16, out32)


def test_temperature():
    q = randn(5, 2, 4)
    want = q * (1 + 0.1 * np.log1p(np.floor((np.arange(3, 8) + 1) / 4.0)))[:, None, None]
    temperature(q, 3, 0.1, 4.0)
    np.testing.assert_allclose(q, want, rtol=1e-6)


def test_per_head():
    x, w = randn(5, 3, 10), randn(3, 7, 8)
    out = np.zeros((5, 3, 7), np.float32)
    per_head(x[:, :, 2:], w, out)  # a strided view, as latent attention passes q's unrotated part
    np.testing.assert_allclose(out, np.einsum("thd,hjd->thj", x[:, :, 2:], w), rtol=1e-5, atol=1e-6)
    one = np.zeros((1, 3, 7), np.float32)
    per_head(x[3:4, :, 2:], w, one)
    np.testing.assert_array_equal(one[0], out[3])  # a row is the same whatever else is in the call


# -- routing ---------------------------------------------------------------------------------------

def naive_topk(values, k):
    return np.argsort(-values, axis=-1, kind="stable")[:, :k]  # stable: ties to the lower index


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk(renormalize):
    logits = randn(7, 8)
    logits[3] = 0.5  # all tied: experts 0, 1, 2 win
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want_idx = naive_topk(p, 3)
    want_w = np.take_along_axis(p, want_idx, 1)
    if renormalize:
        want_w /= want_w.sum(1, keepdims=True)
    idx, w = np.zeros((7, 3), np.int64), np.zeros((7, 3), np.float32)
    softmax_topk(logits.copy(), 3, renormalize, idx, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(idx[3], [0, 1, 2])
    np.testing.assert_allclose(w, want_w, rtol=1e-5)


def test_topk_softmax():
    logits = randn(6, 16)
    logits[0, [4, 9]] = 5.0
    want_idx = naive_topk(logits, 4)
    top = np.take_along_axis(logits, want_idx, 1)
    want_w = np.exp(top - top.max(1, keepdims=True))
    want_w /= want_w.sum(1, keepdims=True)
    idx, w = np.zeros((6, 4), np.int64), np.zeros((6, 4), np.float32)
    topk_softmax(logits, 4, idx, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(idx[0, :2], [4, 9])
    np.testing.assert_allclose(w, want_w, rtol=1e-5)


def test_sigmoid_topk():
    logits = randn(6, 4)
    want_idx = naive_topk(logits, 1)
    idx, w = np.zeros((6, 1), np.int64), np.zeros((6, 1), np.float32)
    sigmoid_topk(logits, 1, idx, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, 1 / (1 + np.exp(-np.take_along_axis(logits, want_idx, 1))), rtol=1e-6)


def naive_sigmoid_group_topk(logits, correction, k, n_group, topk_group, renormalize, scale):
    """transformers' Glm4MoeTopkRouter after its linear layer, in numpy."""
    T, E = logits.shape
    scores = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    choice = scores + correction
    groups = np.sort(choice.reshape(T, n_group, -1), axis=-1)[..., -2:].sum(-1)  # (T, n_group)
    kept = naive_topk(groups, topk_group)
    masked = np.full_like(choice, -np.inf).reshape(T, n_group, -1)
    for t in range(T):
        masked[t, kept[t]] = choice.reshape(T, n_group, -1)[t, kept[t]]
    idx = naive_topk(masked.reshape(T, E), k)
    w = np.take_along_axis(scores, idx, 1)
    if renormalize:
        w = w / (w.sum(1, keepdims=True) + 1e-20)
    return idx, w * np.float32(scale)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_sigmoid_group_topk(renormalize, n_group, topk_group):
    own = np.random.default_rng(2)  # not the module's generator, whose draws the later tests are tuned to
    logits = (2.0 * own.standard_normal((9, 16))).astype(np.float32)
    correction = (0.3 * own.standard_normal(16)).astype(np.float32)
    want_idx, want_w = naive_sigmoid_group_topk(logits, correction, 4, n_group, topk_group, renormalize, 2.5)
    idx, w = np.zeros((9, 4), np.int64), np.zeros((9, 4), np.float32)
    sigmoid_group_topk(logits, correction, 4, n_group, topk_group, renormalize, 2.5, idx, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_allclose(w, want_w, rtol=1e-6)
    if n_group > 1:  # only the kept groups' experts
        assert all(len({e // (16 // n_group) for e in row}) <= topk_group for row in idx)


def naive_softmax_group_topk(logits, k, n_group, topk_group, scale):
    """transformers' DeepseekV2TopkRouter (group_limited_greedy) after its linear layer, in numpy."""
    T, E = logits.shape
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    kept = naive_topk(p.reshape(T, n_group, -1).max(-1), topk_group)
    masked = np.zeros_like(p).reshape(T, n_group, -1)
    for t in range(T):
        masked[t, kept[t]] = p.reshape(T, n_group, -1)[t, kept[t]]
    idx = naive_topk(masked.reshape(T, E), k)
    return idx, np.take_along_axis(masked.reshape(T, E), idx, 1) * np.float32(scale)


@pytest.mark.parametrize("n_group,topk_group,k", [(1, 1, 4), (4, 2, 4), (8, 3, 4), (2, 1, 3)])
def test_softmax_group_topk(n_group, topk_group, k):
    own = np.random.default_rng(3)
    logits = (2.0 * own.standard_normal((9, 16))).astype(np.float32)
    logits[4] = 0.5  # all tied: the lowest groups, then the lowest experts
    want_idx, want_w = naive_softmax_group_topk(logits, k, n_group, topk_group, 1.5)
    idx, w = np.zeros((9, k), np.int64), np.zeros((9, k), np.float32)
    softmax_group_topk(logits, k, n_group, topk_group, 1.5, idx, w)
    np.testing.assert_array_equal(idx, want_idx)
    np.testing.assert_array_equal(idx[4], np.arange(k))
    np.testing.assert_allclose(w, want_w, rtol=1e-6)
    if n_group > 1:  # only the kept groups' experts
        assert all(len({e // (16 // n_group) for e in row}) <= topk_group for row in idx)


def test_group_by_expert():
    T, k, E = 9, 3, 8
    idx = np.array([rng.choice(E - 1, k, replace=False) for _ in range(T)], np.int64)  # expert 7 never chosen
    offsets, order, active = np.zeros(E + 1, np.int64), np.zeros(T * k, np.int64), np.zeros(E, np.int64)
    uses = np.ones(E, np.int64)
    n = group_by_expert(idx, E, offsets, order, active, uses)
    flat = idx.ravel()
    np.testing.assert_array_equal(order, np.argsort(flat, kind="stable"))
    counts = np.bincount(flat, minlength=E)
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(active[:n], np.flatnonzero(counts))
    np.testing.assert_array_equal(uses, counts + 1)


# -- FFN pieces ------------------------------------------------------------------------------------

def test_swiglu():
    gu = randn(5, 2 * 40, scale=3)
    out = np.empty((5, 40), np.float32)
    swiglu(gu, out)
    g, u = gu[:, :40].astype(np.float64), gu[:, 40:]
    np.testing.assert_allclose(out, g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def test_swiglu_clamped():
    gu = randn(5, 2 * 40, scale=6)
    out = np.empty((5, 40), np.float32)
    swiglu_clamped(gu, 1.702, 7.0, out)
    g = np.minimum(gu[:, :40].astype(np.float64), 7.0)
    u = np.clip(gu[:, 40:], -7.0, 7.0)
    np.testing.assert_allclose(out, (u + 1) * g / (1 + np.exp(-1.702 * g)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale_input", [False, True])
def test_gather_scatter(scale_input):
    T, k, H = 6, 2, 8
    x, w = randn(T, H), randn(T, k)
    order = np.array([1, 4, 5, 10], np.int64)  # pairs t * k + slot: (0, 1), (2, 0), (2, 1), (5, 0)
    t, s = order // k, order % k
    xe = np.zeros((4, H), np.float32)
    gather(x, order, k, 1, 4, w, scale_input, xe)
    want = x[t[1:]] * (w[t[1:], s[1:], None] if scale_input else 1)
    np.testing.assert_allclose(xe[:3], want, rtol=1e-6)
    y, out = randn(4, H), randn(T, H)
    want = out.copy()
    for r in range(3):
        want[t[1 + r]] += y[r] * (1 if scale_input else w[t[1 + r], s[1 + r]])
    scatter_add(y, order, k, 1, 4, w, not scale_input, out)
    np.testing.assert_allclose(out, want, rtol=1e-6)


# -- embedding -------------------------------------------------------------------------------------

def packed(encoding, w, gs=32):
    if encoding == "f32":
        return Packed("f32", w.shape, w)
    if encoding == "bf16":
        return Packed("bf16", w.shape, (w.view(np.uint32) >> 16).astype(np.uint16))
    if encoding == "f16":
        return Packed("f16", w.shape, w.astype(np.float16))
    return quantize(w, "F32", QUANT_BITS[encoding], gs)[0]


@pytest.mark.parametrize("encoding", ["f32", "bf16", "f16", "q8", "q6", "q5", "q4"])
def test_embed(encoding):
    p = packed(encoding, randn(50, 72), gs=64 if encoding == "q4" else 32)
    ids = np.array([3, 0, 49, 3], np.int64)
    out = np.zeros((4, 72), np.float32)
    embed(p, ids, out)
    np.testing.assert_allclose(out, dequantize(p)[ids], rtol=1e-6, atol=1e-7)
