"""Gated DeltaNet (moe.runtime.kernels.deltanet) against its slow numpy twin, the chunked form against the stepwise
one, and Qwen3.5-MoE's and Qwen3-Next's tiny checkpoints (converted at 16 bits) against transformers in float32,
with prompts longer than a chunk.
"""

from __future__ import annotations

import numpy as np
import pytest
from moe.convert import convert
from moe.runtime import load_model
from moe.runtime.kernels.deltanet import CHUNK, causal_conv_silu, delta_rule_chunked, delta_rule_step
from tiny import make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

T, NK, NV, DK, DV = 2 * CHUNK + 22, 2, 4, 16, 24  # T: more than two chunks, not a multiple of one
SCALE = DK**-0.5


def relative_error(ours: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(ours - want).max() / np.abs(want).max())


def inputs(seed: int = 0, tokens: int = T):
    """q, k (L2-normalized), v, g (decays of 1-10 % a token), beta, and a non-zero starting state."""
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((tokens, NK, DK)).astype(np.float32) for _ in range(2))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((tokens, NV, DV)).astype(np.float32)
    g = np.log(rng.uniform(0.9, 0.99, (tokens, NV))).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (tokens, NV)).astype(np.float32)
    state = (0.1 * rng.standard_normal((NV, DK, DV))).astype(np.float32)
    return q, k, v, g, beta, state


def naive_delta_rule(q, k, v, g, beta, state):
    """The recurrence as written, in float64: (out, final state)."""
    S = state.astype(np.float64)
    out = np.zeros(v.shape)
    for t in range(q.shape[0]):
        for h in range(NV):
            kh = h // (NV // NK)
            S[h] *= np.exp(g[t, h])
            S[h] += np.outer(k[t, kh], beta[t, h] * (v[t, h] - k[t, kh] @ S[h]))
            out[t, h] = SCALE * q[t, kh] @ S[h]
    return out, S


def run(rule, q, k, v, g, beta, state):
    state, out = state.copy(), np.zeros(v.shape, np.float32)
    rule(q, k, v, g, beta, SCALE, state, out)
    return out, state


def test_step_is_the_recurrence():
    args = inputs()
    out, state = run(delta_rule_step, *args)
    want_out, want_state = naive_delta_rule(*args)
    assert relative_error(out, want_out) < 1e-5
    assert relative_error(state, want_state) < 1e-5


def test_chunked_prefill_ends_in_the_state_of_single_steps():
    q, k, v, g, beta, start = inputs(1)
    out, state = run(delta_rule_chunked, q, k, v, g, beta, start)
    steps, stepped = np.zeros_like(out), start.copy()
    for t in range(T):
        delta_rule_step(q[t: t + 1], k[t: t + 1], v[t: t + 1], g[t: t + 1], beta[t: t + 1], SCALE, stepped,
                        steps[t: t + 1])
    assert relative_error(state, stepped) < 1e-5  # measured 2.8e-7
    assert relative_error(out, steps) < 1e-5


def test_fast_forgetting_heads_match_the_recurrence_and_leave_the_callers_float_mode_alone():
    """Decays of exp(-1.5) a token sum to -96 over a chunk: the kernel flushes the denormals they make (their slow
    path made prefill 3.5x slower) inside its threads only; the result is still the recurrence's."""
    q, k, v, g, beta, start = inputs(4)
    g = np.full_like(g, -1.5)
    out, state = run(delta_rule_chunked, q, k, v, g, beta, start)
    want_out, want_state = naive_delta_rule(q, k, v, g, beta, start)
    assert relative_error(out, want_out) < 1e-5
    assert relative_error(state, want_state) < 1e-5
    assert np.float32(1e-38) * np.float32(0.5) > 0  # this thread still computes denormals


def test_chunked_calls_continue_one_another():
    args = inputs(2)
    whole, whole_state = run(delta_rule_chunked, *args)
    q, k, v, g, beta, state = args
    state = state.copy()
    parts = []
    for lo, hi in ((0, 5), (5, CHUNK + 9), (CHUNK + 9, T)):
        out = np.zeros((hi - lo, NV, DV), np.float32)
        delta_rule_chunked(q[lo:hi], k[lo:hi], v[lo:hi], g[lo:hi], beta[lo:hi], SCALE, state, out)
        parts.append(out)
    assert relative_error(np.concatenate(parts), whole) < 1e-5
    assert relative_error(state, whole_state) < 1e-5


def test_causal_conv_carries_its_state_across_calls():
    rng = np.random.default_rng(3)
    C, K = 12, 4
    x = rng.standard_normal((20, C)).astype(np.float32)
    w = rng.standard_normal((C, K)).astype(np.float32)
    padded = np.concatenate([np.zeros((K - 1, C), np.float32), x])
    conv = np.stack([(padded[t: t + K] * w.T).sum(axis=0) for t in range(20)])
    want = conv / (1 + np.exp(-conv))
    state, got = np.zeros((K - 1, C), np.float32), np.zeros_like(x)
    for lo, hi in ((0, 1), (1, 3), (3, 4), (4, 20)):  # shorter and longer than the state
        causal_conv_silu(x[lo:hi], np.ascontiguousarray(w.T), state, got[lo:hi])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state, x[-(K - 1):])


# ---- the models against transformers

PROMPT, NEW_TOKENS = CHUNK + 50, 12
SOURCES = {  # name -> (arch, make_checkpoint options)
    "qwen3_5_moe-bf16": ("qwen3_5_moe", {}),
    "qwen3_5_moe-f16": ("qwen3_5_moe", dict(dtype="f16")),
    "qwen3_5_moe-sharded-tied": ("qwen3_5_moe", dict(shards=3, tie_word_embeddings=True)),
    "qwen3_next-bf16": ("qwen3_next", {}),
    "qwen3_next-f16": ("qwen3_next", dict(dtype="f16")),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """source -> (Hub-layout folder, 16-bit converted folder)."""
    root = tmp_path_factory.mktemp("deltanet")
    out = {}
    for name, (arch, options) in SOURCES.items():
        src = make_checkpoint(arch, root / name, **options)
        out[name] = src, convert(src, root / f"{name}-16", bits=16)
    return out


def reference(src):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def prompt_ids(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 4096, PROMPT).astype(np.int64)


@pytest.mark.parametrize("source", SOURCES)
def test_prefill_logits_match_transformers(checkpoints, source):
    src, folder = checkpoints[source]
    ids = prompt_ids(0)
    with torch.no_grad():
        want = reference(src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert relative_error(load_model(folder).logits(ids), want) < 1e-5  # measured 1.0e-6 to 1.4e-6


@pytest.mark.parametrize("source", SOURCES)
def test_greedy_through_the_state_matches_transformers(checkpoints, source):
    src, folder = checkpoints[source]
    ids = prompt_ids(1)
    ref = reference(src)
    ref.generation_config.eos_token_id = None  # NEW_TOKENS tokens, whichever they are
    with torch.no_grad():
        want = ref.generate(torch.from_numpy(ids)[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT:]
    got = load_model(folder).generate_tokens(ids, max_tokens=NEW_TOKENS, stop_ids=())
    assert list(got) == want.tolist()


def test_decode_steps_equal_prefill(checkpoints):
    model = load_model(checkpoints["qwen3_5_moe-bf16"][1])
    ids = prompt_ids(2)
    full = model.logits(ids)
    model.reset()
    model.forward(ids[:CHUNK - 3])
    for p in range(CHUNK - 3, PROMPT):
        step = model.forward(ids[p: p + 1], last_only=True)[0]
        assert relative_error(step, full[p]) < 1e-5, f"position {p}"


def test_a_recurrent_state_is_reused_whole_or_not_at_all(checkpoints):
    model = load_model(checkpoints["qwen3_5_moe-bf16"][1])
    ids = prompt_ids(3)
    want = model.logits(ids)[-1]
    model.reset()
    model.forward(ids[:40])
    assert model.cached_prefix(ids) == 40
    assert model.cached_prefix(ids[:40]) == 0  # the last id must run, and the state cannot step back
    other = ids.copy()
    other[7] += 1
    assert model.cached_prefix(other) == 0
    model.reset(model.cached_prefix(ids))
    assert relative_error(model.forward(ids[40:])[-1], want) < 1e-5
    model.reset(0)
    assert relative_error(model.forward(ids)[-1], want) == 0.0
