"""The runtime against transformers on tiny random checkpoints of every architecture (bf16, converted at 16 bits).

Prompts are longer than the sliding window and the attention chunk (8 tokens in tests/tiny.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from moe.convert import convert
from moe.runtime import load_model
from tiny import MODELS, make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = MODELS
PROMPT = 21
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (Hub-layout folder, 16-bit converted folder), built once for the module."""
    root = tmp_path_factory.mktemp("fidelity")
    out = {}
    for arch in ARCHS:
        src = make_checkpoint(arch, root / arch, dtype="bf16")
        out[arch] = src, convert(src, root / f"{arch}-f16", bits=16)
    return out


def reference(src):
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return model.eval()


def prompt_ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 4096, PROMPT).astype(np.int64)


def relative_error(ours: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(ours - want).max() / np.abs(want).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_logits_match_transformers(checkpoints, arch):
    src, folder = checkpoints[arch]
    ids = prompt_ids()
    with torch.no_grad():
        want = reference(src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    ours = load_model(folder).logits(ids)
    assert ours.shape == want.shape
    assert relative_error(ours, want) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_through_kv_cache_matches_transformers(checkpoints, arch):
    src, folder = checkpoints[arch]
    ids = prompt_ids(1)
    ref = reference(src)
    want = []
    with torch.no_grad():
        out = ref(torch.from_numpy(ids)[None], use_cache=True)
        for _ in range(NEW_TOKENS):
            want.append(int(out.logits[0, -1].argmax()))
            out = ref(torch.tensor([[want[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    model = load_model(folder)
    got = [int(model.forward(ids, last_only=True)[0].argmax())]
    while len(got) < NEW_TOKENS:
        got.append(int(model.forward([got[-1]], last_only=True)[0].argmax()))
    assert got == want


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_equal_prefill(checkpoints, arch):
    _, folder = checkpoints[arch]
    ids = prompt_ids(2)
    model = load_model(folder)
    full = model.logits(ids)
    model.reset()
    model.forward(ids[:5])
    for p in range(5, PROMPT):
        step = model.forward(ids[p: p + 1], last_only=True)[0]
        assert relative_error(step, full[p]) < 1e-5, f"position {p}"
    assert model.pos == PROMPT


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_kv_cache_follows_the_exact_cache_and_decodes_as_it_prefills(checkpoints, arch):
    """--kv-cache q8 is not exact, but near it; and a prompt's rows are written before attention reads them, so
    decoding step by step reads what a prefill reads."""
    _, folder = checkpoints[arch]
    ids = prompt_ids(2)
    exact = load_model(folder).logits(ids)
    model = load_model(folder, kv_cache="q8")
    assert model.kv_cache == "q8"
    full = model.logits(ids)
    # per token: the cache's rounding can flip one router's choice at one token (seen: qwen2_moe, glm4_moe), which
    # moves that token's logits by up to 12 %; the typical token measured 0.15-0.8 %
    per_token = np.abs(full - exact).max(axis=1) / np.abs(exact).max()
    assert 0 < np.median(per_token) < 1.5e-2
    model.reset()
    model.forward(ids[:5])
    for p in range(5, PROMPT):
        assert relative_error(model.forward(ids[p: p + 1], last_only=True)[0], full[p]) < 1e-5, f"position {p}"


def test_llama4_multimodal_layout_gives_the_text_model(checkpoints, tmp_path):
    src = make_checkpoint("llama4_multimodal", tmp_path / "mm", dtype="bf16")
    mm = load_model(convert(src, tmp_path / "mm-f16", bits=16))
    text = load_model(checkpoints["llama4"][1])
    ids = prompt_ids()
    np.testing.assert_array_equal(mm.logits(ids), text.logits(ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_logits_follow_16bit(checkpoints, arch, tmp_path):
    src, folder = checkpoints[arch]
    ids = prompt_ids()
    exact = load_model(folder).logits(ids)
    q4 = load_model(convert(src, tmp_path / "q4", bits=4)).logits(ids)
    corr = np.corrcoef(exact.ravel(), q4.ravel())[0, 1]
    assert corr > 0.96  # random weights, every matrix quantized (q4 experts, q5 the rest): measured 0.969-0.99


VARIANTS = {  # what the base checkpoints leave out
    "olmoe-clip_qkv": ("olmoe", dict(clip_qkv=0.5)),
    "mixtral-sliding_window": ("mixtral", dict(sliding_window=8)),
    "qwen3_moe-tied_embeddings": ("qwen3_moe", dict(tie_word_embeddings=True)),
    "gpt_oss-f16": ("gpt_oss", dict(dtype="f16")),
    "llama4-f32": ("llama4", dict(dtype="f32")),
    "deepseek_v2-greedy": ("deepseek_v2", dict(topk_method="greedy")),  # V2-Lite's router
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_transformers(variant, tmp_path):
    arch, options = VARIANTS[variant]
    src = make_checkpoint(arch, tmp_path / "src", **options)
    ids = prompt_ids()
    with torch.no_grad():
        want = reference(src)(torch.from_numpy(ids)[None]).logits[0].numpy()
    model = load_model(convert(src, tmp_path / "f16", bits=16))
    assert relative_error(model.logits(ids), want) < 1e-3
    model.reset()
    model.forward(ids[:-1])
    assert relative_error(model.forward(ids[-1:], last_only=True)[0], want[-1]) < 1e-3
