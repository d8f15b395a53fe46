"""Model names and the home folder, `model_info`, and the bundled demo model."""

import json
import math

import pytest
from moe.convert import convert, demo_model
from moe.convert.safetensors_io import Checkpoint
from moe.runtime.errors import MoeError
from moe.runtime.home import default_output, list_models, model_name, moe_home, resolve_model
from moe.runtime.info import model_info
from moe.runtime.layout import EXPERT_ALIGN
from moe.runtime.tensors import part_of
from tiny import make_checkpoint


def test_home_follows_moe_home(isolated_home):
    assert moe_home() == isolated_home / "moe"
    assert default_output("org/Name-7B", 4) == moe_home() / "models" / "org--Name-7B"
    assert default_output("org/Name-7B", 8).name == "org--Name-7B-q8"
    assert default_output("org/Name-7B", 16).name == "org--Name-7B-f16"


def test_local_folder_names_and_resolution(tmp_path):
    src = make_checkpoint("olmoe", tmp_path / "my-olmoe")
    assert model_name(str(src), 4) == "my-olmoe"
    out = convert(src)
    assert out == moe_home() / "models" / "my-olmoe"
    assert resolve_model("my-olmoe") == out
    assert resolve_model(str(out)) == out
    convert(src, bits=8)
    models = {m["name"]: m for m in list_models()}
    assert sorted(models) == ["my-olmoe", "my-olmoe-q8"]
    assert models["my-olmoe-q8"]["bits"] == 8 and models["my-olmoe"]["architecture"] == "olmoe"
    assert models["my-olmoe"]["size"] == sum(f.stat().st_size for f in out.iterdir())
    with pytest.raises(MoeError, match="not a converted model"):
        resolve_model(str(src))
    with pytest.raises(MoeError, match="org/unknown: no converted model by that name or path; convert it with "
                                       "`moe convert org/unknown`"):
        resolve_model("org/unknown")


def test_partial_conversions_are_not_listed(tmp_path):
    (moe_home() / "models" / ".x.partial-123").mkdir(parents=True)
    assert list_models() == []


def test_model_info_counts_parameters_sizes_and_budget(tmp_path):
    src = make_checkpoint("llama4", tmp_path / "src")
    out = convert(src, tmp_path / "out")
    info = model_info(out)
    m = json.loads((out / "manifest.json").read_text())
    cfg = m["config"]
    H, F, E, k = cfg["hidden_size"], cfg["expert_intermediate_size"], cfg["num_experts"], cfg["top_k"]
    with Checkpoint(src) as ckpt:
        source_params = sum(math.prod(ckpt.info(n).shape) for n in ckpt.names())
    assert info["total_params"] == source_params
    per_expert = 3 * H * F
    moe_layers = [i for i, s in enumerate(cfg["layers"]) if s["moe"]]
    assert info["active_params"] == source_params - len(moe_layers) * (E - k) * per_expert
    assert (info["layers"], info["moe_layers"], info["experts"], info["top_k"]) == (4, 2, 4, 1)
    assert info["shared_expert"] is True
    assert sum(info["size_by_part"].values()) <= info["size_bytes"]
    assert info["quantization_by_part"] == {"embeddings": ["q5"], "attention": ["q5", "q6"], "routers": ["bf16"],
                                            "experts": ["q4"], "other": ["f32", "q5"]}
    runs = m["experts"]
    slot = max(-(-r["nbytes"] // EXPERT_ALIGN) * EXPERT_ALIGN for records in runs.values() for r in records)
    assert info["min_budget_bytes"] == k * slot  # top-k slots of the largest expert: what paging enforces
    assert info["ram_bytes"] == m["files"]["model.bin"]["size"] + m["files"]["experts.bin"]["size"]
    assert info["ram_bytes_min_budget"] == m["files"]["model.bin"]["size"] + info["min_budget_bytes"]


def test_parts():
    assert [part_of(n) for n in ("embed", "lm_head", "norm", "layers.0.attn.qkv", "layers.0.attn.sinks",
                                 "layers.1.router", "layers.1.router_bias", "layers.1.experts.3.down",
                                 "layers.1.shared.gate_up", "layers.0.mlp.down", "layers.0.ffn_norm")] == [
        "embeddings", "embeddings", "other", "attention", "attention", "routers", "routers", "experts", "other",
        "other", "other"]


def test_demo_model_converts_once(capsys):
    path = demo_model()
    assert path == moe_home() / "models" / "demo-tinymix"
    assert "converting the bundled demo model" in capsys.readouterr().err
    m = json.loads((path / "manifest.json").read_text())
    assert m["architecture"] == "mixtral" and m["quantization"]["experts"] == "q4"
    assert demo_model() == path
    assert capsys.readouterr().err == ""


def test_demo_model_from_an_older_layout_is_converted_again(capsys):
    path = demo_model()
    manifest = path / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format_version": m["format_version"] - 1}))
    capsys.readouterr()
    assert demo_model() == path
    assert "older moe" in capsys.readouterr().err
    assert json.loads(manifest.read_text())["format_version"] == m["format_version"]
