"""The model's own contract: only chosen experts are touched, prefill groups them, decode allocates
nothing, the KV cache and its limits, stats, and the first-run compile notice."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from moe.convert import convert
from moe.runtime import kernels
from moe.runtime.budget import kv_cache_bytes
from moe.runtime.errors import MoeError
from moe.runtime.experts import ExpertStore, MappedExperts, weights_in
from moe.runtime.layout import EXPERTS_FILE
from moe.runtime.model import load_model
from tiny import make_checkpoint

IDS = np.random.default_rng(5).integers(4, 4096, 20).astype(np.int64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """arch -> a 4-bit conversion of its tiny checkpoint."""
    root = tmp_path_factory.mktemp("model")
    return {arch: convert(make_checkpoint(arch, root / arch), root / f"{arch}-q4", bits=4)
            for arch in ("olmoe", "llama4")}


class RecordingStore(MappedExperts):
    """The mapped store, noting every get()."""

    def __init__(self, layout):
        super().__init__(layout)
        self.calls = []

    def get(self, layer, expert):
        self.calls.append((layer, expert))
        return super().get(layer, expert)


class CopyingStore(ExpertStore):
    """What a paging store does: each expert's run read from the file into its own buffer."""

    def __init__(self, layout):
        super().__init__(layout)
        self.path = layout.folder / EXPERTS_FILE

    def get(self, layer, expert):
        run = self.layout.expert_record(layer, expert)
        with open(self.path, "rb") as f:
            f.seek(run["offset"])
            buf = bytearray(f.read(run["nbytes"]))
        return weights_in(buf, self.layout.expert_tensors(layer, expert), run["offset"])


def with_store(model, store_cls):
    model.experts = store_cls(model.layout)
    return model


@pytest.mark.parametrize("arch", ["olmoe", "llama4"])
def test_prefill_reads_each_chosen_expert_once_per_layer(folders, arch):
    model = with_store(load_model(folders[arch]), RecordingStore)
    model.routing_trace = []
    model.logits(IDS)
    for layer, idx, weights in model.routing_trace:
        chosen = sorted(set(idx.ravel().tolist()))
        assert [e for i, e in model.experts.calls if i == layer] == chosen
        assert idx.shape == weights.shape == (IDS.size, model.config.top_k)


def test_decode_reads_only_the_top_k(folders):
    model = with_store(load_model(folders["olmoe"]), RecordingStore)
    model.forward(IDS[:5])
    model.experts.calls.clear()
    model.routing_trace = []
    model.forward(IDS[5:6], last_only=True)
    for layer, idx, _ in model.routing_trace:
        assert sorted(e for i, e in model.experts.calls if i == layer) == sorted(idx[0].tolist())
    assert len(model.experts.calls) == len(model.config.moe_layers()) * model.config.top_k


@pytest.mark.parametrize("arch", ["olmoe", "llama4"])
def test_a_store_that_copies_runs_gives_identical_logits(folders, arch):
    want = load_model(folders[arch]).logits(IDS)
    got = with_store(load_model(folders[arch]), CopyingStore).logits(IDS)
    np.testing.assert_array_equal(got, want)


def test_prefill_in_pieces_equals_one_prefill(folders):
    model = load_model(folders["llama4"])
    want = model.logits(IDS)
    model.reset()
    model.forward(IDS[:7])
    np.testing.assert_allclose(model.forward(IDS[7:]), want[7:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_cache,dtype", [("auto", np.uint16), ("f32", np.float32), ("bf16", np.uint16),
                                             ("q8", np.int8)])
def test_kv_cache_forms_hold_what_their_bytes_say(folders, kv_cache, dtype):
    """A 4-bit model's cache is bfloat16 unless asked otherwise; q8 keeps int8 codes and a float32 scale per row,
    and the budget counts those bytes."""
    model = load_model(folders["olmoe"], max_context=64, kv_cache=kv_cache)
    cfg = model.config
    assert model.kv_cache == {"auto": "bf16"}.get(kv_cache, kv_cache) and model._k.dtype == dtype
    scales = model._ks.nbytes + (model._vs.nbytes if model._vs is not model._ks else 0)
    assert scales == (cfg.num_layers * cfg.kv_cache_rows * 64 * 4 if kv_cache == "q8" else 0)
    assert kv_cache_bytes(cfg, 64, np.dtype(dtype)) == model._k.nbytes + model._v.nbytes + scales
    model.forward(IDS[:5])
    assert model._k[:, :, :5].any() and not model._k[:, :, 5:].any()


@pytest.mark.parametrize("kv_cache", ["bf16", "q8"])
def test_decode_allocates_nothing(folders, kv_cache):
    model = load_model(folders["olmoe"], kv_cache=kv_cache)
    model.forward(IDS[:4])
    token = IDS[4:5]
    model.forward(token, last_only=True)  # first decode: buffers exist, kernels are loaded
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(5):
        out = model.forward(token, last_only=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.shape == (1, model.config.vocab_size)
    # Python's own small objects (views, lists) come and go; no logits or activation buffer does.
    assert peak - base < model.config.vocab_size * 4 // 2


def test_stats_count_tokens_and_expert_uses(folders):
    model = load_model(folders["olmoe"])
    model.logits(IDS)
    model.forward(IDS[:1], last_only=True)
    s = model.stats
    assert s["tokens"] == IDS.size + 1
    assert s["hits"] == s["misses"] == s["bytes_read"] == 0
    assert [layer["layer"] for layer in s["layers"]] == model.config.moe_layers()
    for layer in s["layers"]:
        assert sum(layer["expert_uses"]) == (IDS.size + 1) * model.config.top_k


def test_context_limit_is_a_usage_error(folders):
    model = load_model(folders["olmoe"], max_context=16)
    with pytest.raises(MoeError, match="exceed the context of 16") as e:
        model.logits(IDS)
    assert e.value.exit_code == 2
    model.logits(IDS[:16])
    with pytest.raises(MoeError, match="context"):
        model.forward(IDS[:1])


@pytest.mark.parametrize("ids", [[], [[1, 2]], [4096], [-1]])
def test_bad_token_ids_are_usage_errors(folders, ids):
    with pytest.raises(MoeError) as e:
        load_model(folders["olmoe"]).logits(ids)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("option", [dict(threads=0), dict(threads=10**6), dict(max_context=0), dict(kv_cache="q4")])
def test_bad_options_are_usage_errors(folders, option):
    with pytest.raises(MoeError) as e:
        load_model(folders["olmoe"], **option)
    assert e.value.exit_code == 2


def test_compile_notice_once_when_the_cache_is_cold(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "cold"))  # the marker is looked for here
    monkeypatch.setattr(kernels, "_announced", False)
    model = load_model(folders["olmoe"])
    assert capsys.readouterr().err.count("compiling kernels (first run only)") == 1
    assert model.pos == 0 and model.stats["tokens"] == 0
    assert not kernels.cache_is_cold()
    load_model(folders["olmoe"])
    assert "compiling" not in capsys.readouterr().err


def test_perplexity_scores_whole_windows(folders):
    from moe.runtime.perplexity import perplexity

    model = load_model(folders["olmoe"])
    ids = np.random.default_rng(9).integers(4, 4096, 27)
    seen = []
    ppl, scored = perplexity(model, ids, 8, progress=lambda done, total: seen.append((done, total)))
    nll = []
    for w in range(3):  # 27 tokens: three windows of 8, the last 3 tokens dropped
        window = ids[8 * w: 8 * w + 8]
        logits = model.logits(window).astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        nll += [-logp[t, window[t + 1]] for t in range(7)]
    assert scored == 21
    assert ppl == pytest.approx(np.exp(np.mean(nll)), rel=1e-6)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    for ctx in (1, 28, 10**6):
        with pytest.raises(MoeError):
            perplexity(model, ids, ctx)


def test_generate_tokens_is_the_greedy_loop(folders):
    model = load_model(folders["llama4"])
    got = list(model.generate_tokens(IDS, max_tokens=6, temperature=0, stop_ids=[]))
    want = [int(model.logits(IDS)[-1].argmax())]
    while len(want) < 6:
        want.append(int(model.forward(want[-1:], last_only=True)[0].argmax()))
    assert got == want
