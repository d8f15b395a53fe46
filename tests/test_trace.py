"""`moe trace`: the experts and weights each token chose equal transformers' own router on the same weights."""

import json

import numpy as np
import pytest
import torch
import transformers
from moe.cli import main
from moe.convert import convert
from moe.runtime.model import load_model
from moe.runtime.routing_stats import trace
from tiny import make_checkpoint

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def pair(request, tmp_path_factory):
    """(transformers model, our 16-bit model) of the same f32 weights; qwen3_moe has a dense layer 1."""
    root = tmp_path_factory.mktemp(request.param)
    src = make_checkpoint(request.param, root / "src", dtype="f32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ours = load_model(convert(str(src), root / "out", bits=16))
    yield hf, ours
    ours.close()


def hf_routing(hf, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per MoE layer, transformers' (top-k indices, weights) from hooks on its routers."""
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, (out[2].numpy(), out[1].detach().numpy())))
        for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return seen


def test_experts_and_weights_equal_transformers_router(pair):
    hf, ours = pair
    ids = ours.tokenizer.encode(PROMPT, add_bos=False)
    result = trace(ours, ids)
    expected = hf_routing(hf, ids)
    assert [t["id"] for t in result["tokens"]] == ids
    assert "".join(t["text"] for t in result["tokens"]) == PROMPT
    for t, token in enumerate(result["tokens"]):
        assert [entry["layer"] for entry in token["layers"]] == sorted(expected) == ours.config.moe_layers()
        for entry in token["layers"]:
            idx, w = expected[entry["layer"]]
            theirs = dict(zip(idx[t].tolist(), w[t].tolist(), strict=True))
            assert set(entry["experts"]) == set(theirs)
            assert entry["weights"] == sorted(entry["weights"], reverse=True)
            for e, weight in zip(entry["experts"], entry["weights"], strict=True):
                assert weight == pytest.approx(theirs[e], abs=1e-4)


def test_trace_leaves_the_model_as_it_was(pair):
    _, ours = pair
    trace(ours, [5, 6, 7])
    assert ours.routing_trace is None and ours.pos == 3


def test_cli_json_table_and_svg(pair, capsys, tmp_path):
    _, ours = pair
    folder = str(ours.layout.folder)
    assert main(["trace", folder, "def f(x):", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"tokens"}
    token = result["tokens"][0]
    assert set(token) == {"id", "text", "layers"} and set(token["layers"][0]) == {"layer", "experts", "weights"}
    assert len(token["layers"][0]["experts"]) == ours.config.top_k
    svg = tmp_path / "trace.svg"
    assert main(["trace", folder, "def f(x):", "--svg", str(svg)]) == 0
    out = capsys.readouterr().out
    assert "layer 0" in out and "def" in out
    assert svg.read_text().startswith("<svg") and "layer&#160;0" in svg.read_text()
    assert main(["trace", folder, ""]) == 2
    assert capsys.readouterr().err.strip() == "error: PROMPT holds no token; give some text"
