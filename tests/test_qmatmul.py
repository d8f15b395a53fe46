"""The matmul kernels against slow numpy twins built from layout.dequantize."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from moe.runtime.codec import dequantize, pack_codes
from moe.runtime.kernels import qmatmul, simd
from moe.runtime.kernels.bits import bf16_to_f32, f16_to_f32, f16_to_f32_exact
from moe.runtime.layout import CHUNK, QUANT_BITS, Packed, padded_cols, supers_of
from numba import njit
from numba.core.codegen import get_host_cpu_features

SHAPES = [(1, 32, 1), (3, 40, 2), (37, 96, 1), (64, 200, 5), (130, 256, 70), (5, 1000, 3), (17, 64, 64),
          (9, 400, 6), (33, 2048, 1)]  # 400: 8 blocks by vector, 5 by the scalar tail


def make_packed(enc: str, rows: int, cols: int, gs: int, rng) -> Packed:
    """A random tensor in encoding `enc`, its padding columns zero as the converter writes them."""
    if enc in ("f32", "bf16", "f16"):
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        if enc == "f32":
            return Packed("f32", (rows, cols), w)
        if enc == "f16":
            return Packed("f16", (rows, cols), w.astype(np.float16))
        return Packed("bf16", (rows, cols), (w.view(np.uint32) >> 16).astype(np.uint16))
    cp = padded_cols(cols, gs)
    groups = cp // gs
    # as the quantizer's: |k| within 4x of its super-block's largest, either sign
    scales = (rng.integers(32, 128, (rows, groups)) * rng.choice([-1, 1], (rows, groups))).astype(np.int8)
    supers = (rng.random((rows, supers_of(groups))) * 0.1 + 0.001).astype(np.float32).view(np.uint32) >> 16
    if enc == "q8":
        codes = rng.integers(-128, 128, (rows, cp), dtype=np.int8)
        codes[:, cols:] = 0
    else:
        bits = QUANT_BITS[enc]
        c = rng.integers(0, 1 << bits, (rows, cp), dtype=np.uint8)
        c[:, cols:] = 1 << (bits - 1)  # the code of zero
        codes = pack_codes(c, bits)
    return Packed(enc, (rows, cols), codes, scales, gs, supers.astype(np.uint16))


def quantize_acts_twin(x: np.ndarray, cols_pad: int) -> tuple[np.ndarray, np.ndarray]:
    T, cols = x.shape
    xp = np.zeros((T, cols_pad), np.float32)
    xp[:, :cols] = x
    blocks = xp.reshape(T, cols_pad // CHUNK, CHUNK)
    scale = np.abs(blocks).max(axis=2) / np.float32(127.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scale[:, :, None] > 0, np.rint(blocks / scale[:, :, None]), 0)
    return q.astype(np.int8).reshape(T, cols_pad), scale.astype(np.float32)


def acts(T: int, cols: int, rng) -> np.ndarray:
    x = rng.standard_normal((T, cols)).astype(np.float32)
    x[:, ::7] *= 10  # uneven magnitudes inside a block
    if T > 1:
        x[1] = 0  # an all-zero token: scale 0
    return x


@njit
def _convert(fn_id, h, out):
    for i in range(h.size):
        if fn_id == 0:
            out[i] = f16_to_f32(h[i])
        elif fn_id == 1:
            out[i] = f16_to_f32_exact(h[i])
        else:
            out[i] = bf16_to_f32(h[i])


@pytest.mark.parametrize("fn_id", [0, 1], ids=["hardware", "integer"])
def test_f16_conversion_exact_over_all_bit_patterns(fn_id):
    h = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(h.size, np.float32)
    _convert(fn_id, h, got)
    ref = h.view(np.float16).astype(np.float32)
    finite = np.isfinite(ref)
    assert np.array_equal(got.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    assert np.array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    assert np.isnan(got[np.isnan(ref)]).all()


def test_bf16_conversion_exact_over_all_bit_patterns():
    h = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(h.size, np.float32)
    _convert(2, h, got)
    ref = (h.astype(np.uint32) << 16).view(np.float32)
    finite = np.isfinite(ref)
    assert np.array_equal(got.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    assert np.isnan(got[np.isnan(ref)]).all()


@pytest.mark.parametrize("T,cols", [(1, 32), (3, 45), (70, 200)])
def test_quantize_acts_matches_twin(T, cols):
    rng = np.random.default_rng(T * 1000 + cols)
    x = acts(T, cols, rng)
    cp = padded_cols(cols, 64)
    xq = np.full((T, cp), 99, np.int8)
    xs = np.full((T, cp // CHUNK), -1, np.float32)
    qmatmul.quantize_acts(x, xq, xs)
    ref_q, ref_s = quantize_acts_twin(x, cp)
    assert np.array_equal(xq, ref_q)
    assert np.array_equal(xs, ref_s)
    assert np.abs(xq).max() <= 127


def arrange_twin(xq: np.ndarray) -> np.ndarray:
    """Each whole group of simd.GROUP blocks in units of simd.UNIT columns, ordered (unit within a half, half,
    block): pairs of 16-column halves on x86 ([c0[:16], c1[:16], c0[16:], c1[16:]]), groups of 4 in 4-column
    units for arm64's sdot; the blocks of a last, partial group stay."""
    T, cp = xq.shape
    unit, group = simd.UNIT, simd.GROUP
    out = xq.copy()
    whole = cp // (CHUNK * group) * CHUNK * group
    blocks = xq[:, :whole].reshape(T, -1, group, 2, 16 // unit, unit)  # (T, group, block, half, unit, column)
    out[:, :whole] = blocks.transpose(0, 1, 4, 3, 2, 5).reshape(T, whole)
    return out


@pytest.mark.parametrize("T,cols,gs", [(1, 64, 32), (3, 45, 32), (2, 96, 96), (70, 200, 64), (1, 2048, 32)])
def test_prepare_acts_matches_twin(T, cols, gs):
    rng = np.random.default_rng(T + cols)
    x = acts(T, cols, rng)
    cp = padded_cols(cols, gs)
    bufs = qmatmul.Scratch(T, cp).acts(T, cp)
    for b in bufs:
        b.fill(99)
    xq, xqa, xs, xsum = bufs
    qmatmul.prepare_acts(x, xq, xqa, xs, xsum)
    ref_q, ref_s = quantize_acts_twin(x, cp)
    assert np.array_equal(xq, ref_q)
    assert np.array_equal(xs, ref_s)
    assert np.array_equal(xqa, arrange_twin(ref_q))
    sums = ref_q.reshape(T, -1, CHUNK).astype(np.int32).sum(axis=2).astype(np.float32)
    assert np.array_equal(xsum, sums * ref_s)


def _close(got: np.ndarray, ref: np.ndarray, scale: np.ndarray, rtol: float) -> None:
    """|got - ref| within rtol of the sum of |terms| (the natural scale of float rounding in a dot product)."""
    assert got.shape == ref.shape
    assert np.all(np.abs(got - ref) <= rtol * scale + 1e-30), np.abs(got - ref).max()


@pytest.mark.parametrize("enc", ["q4", "q5", "q6", "q8"])
@pytest.mark.parametrize("gs", [32, 64, 96, 256])
@pytest.mark.parametrize("rows,cols,T", SHAPES)
def test_quantized_matches_dequantized_twin(enc, gs, rows, cols, T):
    rng = np.random.default_rng(rows * 7 + cols * 3 + T + gs)
    p = make_packed(enc, rows, cols, gs, rng)
    x = acts(T, cols, rng)
    cp = padded_cols(cols, gs)
    xq, xs = quantize_acts_twin(x, cp)
    out = np.full((T, rows), np.nan, np.float32)
    qmatmul.matmul_quant(p.codes, p.scales, p.supers, gs, xq, xs, out, QUANT_BITS[enc])
    w = dequantize(p).astype(np.float64)  # [rows, cols]
    xd = (xq[:, :cols] * xs.repeat(CHUNK, axis=1)[:, :cols]).astype(np.float64)
    _close(out, xd @ w.T, np.abs(xd) @ np.abs(w).T, 1e-5)
    # and the quantized product stays close to the float one
    full = x.astype(np.float64) @ w.T
    _close(out, full, np.abs(x) @ np.abs(w).T, 2e-2)


@pytest.mark.parametrize("enc", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,cols,T", SHAPES)
def test_float_matches_dequantized_twin(enc, rows, cols, T):
    rng = np.random.default_rng(rows * 5 + cols + T)
    p = make_packed(enc, rows, cols, 0, rng)
    x = acts(T, cols, rng)
    out = np.full((T, rows), np.nan, np.float32)
    qmatmul.linear(p, x, out, qmatmul.Scratch())
    w = dequantize(p).astype(np.float64)
    _close(out, x.astype(np.float64) @ w.T, np.abs(x).astype(np.float64) @ np.abs(w).T, 1e-5)


@pytest.mark.parametrize("enc", ["q4", "q5", "q6", "q8", "f32", "bf16", "f16"])
def test_linear_dispatch_and_scratch_reuse(enc):
    rng = np.random.default_rng(3)
    scratch = qmatmul.Scratch(max_tokens=4, max_cols=96)
    for rows, cols, T in [(9, 96, 1), (5, 40, 4), (7, 300, 2), (9, 96, 1)]:
        p = make_packed(enc, rows, cols, 32, rng)
        for a in (p.codes, p.scales, p.supers):  # as memory-mapped tensors are
            if a is not None:
                a.setflags(write=False)
        x = acts(T, cols + 5, rng)[:, 2 : cols + 2]  # a strided view, as a slice of a wider buffer is
        out = np.empty((T, rows), np.float32)
        qmatmul.linear(p, x, out, scratch)
        w = dequantize(p).astype(np.float64)
        _close(out, x @ w.T, np.abs(x) @ np.abs(w).T, 2e-2 if enc[0] == "q" else 1e-5)
        if enc[0] == "q":  # the activations were quantized exactly as the twin does
            xq, _, xs, _ = scratch.acts(T, p.codes.shape[1] * 8 // QUANT_BITS[enc])
            ref_q, ref_s = quantize_acts_twin(x, xq.shape[1])
            assert np.array_equal(xq, ref_q) and np.array_equal(xs, ref_s)


@pytest.mark.parametrize("enc", ["q4", "q6", "q8", "f32"])
@pytest.mark.parametrize("rows, cols, gs", [(37, 96, 32), (9, 400, 32), (17, 192, 96), (40, 2048, 64)])
def test_linear_each_equals_linear_per_weight(enc, rows, cols, gs):
    """A token's k experts in one call give, bit for bit, what linear() gives for each alone."""
    rng = np.random.default_rng(rows)
    scratch = qmatmul.Scratch()
    weights = [make_packed(enc, rows, cols, gs, rng) for _ in range(4)]
    for w in weights:  # read-only, as the memory-mapped experts are
        for a in (w.codes, w.scales, w.supers):
            if a is not None:
                a.setflags(write=False)
    x = acts(4, cols, rng)
    got = qmatmul.linear_each(weights, x, np.empty((4, rows), np.float32), scratch)
    for j, w in enumerate(weights):
        alone = qmatmul.linear(w, x[j: j + 1], np.empty((1, rows), np.float32), qmatmul.Scratch())
        assert np.array_equal(got[j], alone[0])


@pytest.mark.parametrize("enc", ["q4", "q5", "q6"])
@pytest.mark.parametrize("rows, cols, gs", [(48, 256, 32), (40, 2080, 64), (35, 544, 128), (16, 96, 96)])
def test_linear_prefill_tiles_equal_one_token_at_a_time(enc, rows, cols, gs):
    """Prefill's tiles of rows and tokens (on x86, interleaved rows: simd.dot_tile) give each token the bits its
    own one-token product gives: whole tiles, a last partial one, tails of blocks, groups of 3 blocks."""
    rng = np.random.default_rng(rows + cols + gs)
    p = make_packed(enc, rows, cols, gs, rng)
    x = acts(11, cols, rng)
    whole = np.empty((11, rows), np.float32)
    qmatmul.linear(p, x, whole, qmatmul.Scratch())
    alone = np.empty_like(whole)
    for t in range(11):
        qmatmul.linear(p, x[t: t + 1], alone[t: t + 1], qmatmul.Scratch())
    assert np.array_equal(whole.view(np.uint32), alone.view(np.uint32))


def test_disagreeing_shapes_raise_instead_of_reading_out_of_bounds():
    rng = np.random.default_rng(5)
    p = make_packed("q4", 8, 64, 32, rng)
    scratch = qmatmul.Scratch()
    with pytest.raises(ValueError):  # x wider than the weight
        qmatmul.linear(p, acts(1, 96, rng), np.empty((1, 8), np.float32), scratch)
    with pytest.raises(ValueError):  # out of the wrong shape
        qmatmul.linear(p, acts(2, 64, rng), np.empty((2, 9), np.float32), scratch)
    with pytest.raises(ValueError):  # scales of another group size
        qmatmul.linear(Packed("q4", p.shape, p.codes, p.scales[:, :1].copy(), 32, p.supers), acts(1, 64, rng),
                       np.empty((1, 8), np.float32), scratch)


def test_scratch_decode_reuses_buffers():
    scratch = qmatmul.Scratch(max_tokens=2, max_cols=2048)
    first = scratch.acts(1, 2048)
    again = scratch.acts(2, 1024)
    assert all(np.shares_memory(a, b) for a, b in zip(first, again, strict=True))


def _without(features: str, dropped: tuple[str, ...]) -> str:
    return ",".join(("-" + f[1:]) if any(k in f for k in dropped) else f for f in features.split(","))


# Other CPUs, emulated by compiling for them: AVX2 without AVX-512/VNNI (the x86 path's AVX2 code), AVX-VNNI
# without AVX-512 (256-bit multiply-adds of bytes), and a baseline x86-64 (the portable vector path, as on arm64,
# and the integer half conversion).
TARGETS = {
    "avx2-only": ("haswell", lambda f: _without(f, ("avx512", "vnni", "amx", "avx10")), "1"),
    "avx-vnni": ("alderlake", lambda f: _without(f, ("avx512", "amx", "avx10")), "1"),
    "portable": ("x86-64", lambda f: "", "0"),
}


def _emulates_another_cpu(target: str) -> bool:
    """An x86 SIMD host can stand in for the portable path; only an AVX-512 / VNNI one for plain AVX2; only one
    with AVX-VNNI and AVX-512 for AVX-VNNI alone."""
    host = simd.target_features()
    if target == "avx-vnni":
        return simd.target_has_x86_simd() and {"avxvnni", "avx512f"} <= host
    return simd.target_has_x86_simd() and (target == "portable" or "avx512f" in host or simd.has_vnni(host))


@pytest.mark.parametrize("target", TARGETS)
def test_other_cpus_in_a_subprocess(target):
    """The kernels compiled for another CPU give the same answers (numba caches per target)."""
    if not _emulates_another_cpu(target):  # asked when run, not at collection: host detection may raise
        pytest.skip("this CPU is that target, or cannot emulate it")
    cpu, features, expect_simd = TARGETS[target]
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features(get_host_cpu_features()),
               MOE_EXPECT_SIMD=expect_simd)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__, "-k",
         "target_reports or conversion or (twin and (32 or 64)) or linear or thread"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-3000:]


@pytest.mark.skipif("MOE_EXPECT_SIMD" not in os.environ, reason="run by test_other_cpus_in_a_subprocess")
def test_target_reports_simd_as_expected():
    assert simd.target_has_x86_simd() == (os.environ["MOE_EXPECT_SIMD"] == "1")


@pytest.mark.parametrize("enc", ["q4", "q6", "q8"])
def test_deterministic_across_thread_counts(enc):
    import numba

    rng = np.random.default_rng(11)
    p = make_packed(enc, 301, 512, 32, rng)
    x = acts(5, 512, rng)
    outs = []
    saved = numba.get_num_threads()
    try:
        for n in (1, saved):
            numba.set_num_threads(n)
            out = np.empty((5, 301), np.float32)
            qmatmul.linear(p, x, out, qmatmul.Scratch())
            outs.append(out)
    finally:
        numba.set_num_threads(saved)
    assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
