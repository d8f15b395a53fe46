"""Conversion of every architecture: tensors accounted for, values moved to the right place, quantization bounds."""

import json

import numpy as np
import pytest
import torch
from moe.convert import arch, convert
from moe.convert.safetensors_io import Checkpoint
from moe.convert.synthetic import write_synthetic_checkpoint
from moe.runtime.codec import dequantize
from moe.runtime.layout import open_layout, verify
from safetensors.torch import load_file
from test_convert_quant import assert_nearest_values
from tiny import ARCHS, make_checkpoint, tiny_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """make_checkpoint, cached per module: source(arch, **kw) -> folder."""
    made = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = make_checkpoint(name, tmp_path_factory.mktemp(name), **kw)
        return made[key]

    return get


def state_dict(folder):
    """The source tensors as float32 torch tensors, multimodal prefixes stripped."""
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(f).items():
            sd[name.removeprefix("language_model.").replace("model.language_model.", "model.", 1)] = t.float()
    return sd


def reference(name_of_arch, sd, name):
    """What layout tensor `name` must hold, written from ARCHITECTURES.md independently of the converter."""
    if name in ("embed", "norm", "lm_head"):
        return sd[{"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}[name]]
    parts = name.split(".")
    p = f"model.layers.{parts[1]}."
    rest = ".".join(parts[2:])
    a = p + "self_attn."
    plain = {"attn_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight",
             "attn.o": a + "o_proj.weight", "attn.o_bias": a + "o_proj.bias", "attn.q_norm": a + "q_norm.weight",
             "attn.k_norm": a + "k_norm.weight", "attn.sinks": a + "sinks", "attn.q": a + "q_proj.weight",
             "attn.q_a": a + "q_a_proj.weight", "attn.q_a_norm": a + "q_a_layernorm.weight",
             "attn.q_b": a + "q_b_proj.weight", "attn.kv_a": a + "kv_a_proj_with_mqa.weight",
             "attn.kv_a_norm": a + "kv_a_layernorm.weight", "attn.kv_b": a + "kv_b_proj.weight"}
    lin = p + "linear_attn."
    if rest.startswith("linear.") or (rest == "attn.o" and lin + "out_proj.weight" in sd):
        if rest == "linear.in" and lin + "in_proj_qkvz.weight" in sd:  # Qwen3-Next: rows grouped by key head
            return qwen3_next_projections(sd, lin, tiny_config(name_of_arch)["linear_num_key_heads"])
        if rest == "linear.in":
            return torch.cat([sd[f"{lin}in_proj_{x}.weight"] for x in ("qkv", "z", "b", "a")])
        return {"linear.conv": lambda: sd[lin + "conv1d.weight"][:, 0], "linear.a_log": lambda: sd[lin + "A_log"],
                "linear.dt_bias": lambda: sd[lin + "dt_bias"], "linear.norm": lambda: sd[lin + "norm.weight"],
                "attn.o": lambda: sd[lin + "out_proj.weight"]}[rest]()
    if rest in plain:
        return sd[plain[rest]]
    if rest in ("attn.qkv", "attn.qkv_bias"):
        kind = "weight" if rest == "attn.qkv" else "bias"
        return torch.cat([sd[f"{a}{x}_proj.{kind}"] for x in "qkv"])
    ff = p + ("feed_forward." if name_of_arch.startswith("llama4") else "mlp.")
    if rest in ("router", "router_bias"):
        key = {"mixtral": p + "block_sparse_moe.gate.weight", "gpt_oss": ff + "router.weight",
               "llama4": ff + "router.weight"}.get(name_of_arch.removesuffix("_multimodal"), ff + "gate.weight")
        return sd[key.replace("weight", "bias") if rest == "router_bias" else key]
    if rest == "router_correction":
        return sd[ff + "gate.e_score_correction_bias"]
    if rest == "shared.gate":
        return sd[ff + "shared_expert_gate.weight"]
    if parts[2] in ("shared", "mlp"):
        shared = ("shared_experts." if name_of_arch in ("glm4_moe", "deepseek_v3", "deepseek_v2", "glm4_moe_lite")
                  else "shared_expert.")
        q = ff + (shared if parts[2] == "shared" else "")
        if parts[3] == "gate_up":
            return torch.cat([sd[q + "gate_proj.weight"], sd[q + "up_proj.weight"]])
        return sd[q + "down_proj.weight"]
    j, what = int(parts[3]), parts[4]
    if name_of_arch == "mixtral":
        e = f"{p}block_sparse_moe.experts.{j}."
        return torch.cat([sd[e + "w1.weight"], sd[e + "w3.weight"]]) if what == "gate_up" else sd[e + "w2.weight"]
    if name_of_arch in ("qwen3_moe", "olmoe", "qwen2_moe", "glm4_moe", "deepseek_v3", "deepseek_v2", "glm4_moe_lite",
                        "qwen3_5_moe", "qwen3_next"):
        e = f"{ff}experts.{j}."
        if what == "gate_up":
            return torch.cat([sd[e + "gate_proj.weight"], sd[e + "up_proj.weight"]])
        return sd[e + "down_proj.weight"]
    if name_of_arch == "qwen3_5_moe_multimodal":  # fused as [E, out, in]: gate rows, then up rows
        return sd[ff + f"experts.{what}_proj"][j]
    gate_up, down = sd[ff + "experts.gate_up_proj"][j], sd[ff + "experts.down_proj"][j]  # (H, 2F), (F, H)
    if name_of_arch.startswith("llama4"):
        return gate_up.T if what == "gate_up" else down.T  # gate = first F columns
    if what == "gate_up":  # gpt-oss: gate = even columns, up = odd
        return torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T])
    if what == "gate_up_bias":
        b = sd[ff + "experts.gate_up_proj_bias"][j]
        return torch.cat([b[0::2], b[1::2]])
    return down.T if what == "down" else sd[ff + "experts.down_proj_bias"][j]


def qwen3_next_projections(sd, lin, nk):
    """in_proj_qkvz's and in_proj_ba's rows regrouped: every key head's q, then k, v, z, b, a."""
    qkvz, ba = sd[lin + "in_proj_qkvz.weight"], sd[lin + "in_proj_ba.weight"]
    H = qkvz.shape[1]
    lv = sd[lin + "A_log"].numel() * sd[lin + "norm.weight"].numel()
    dk = (sd[lin + "conv1d.weight"].shape[0] - lv) // 2 // nk
    qkvz, ba = qkvz.reshape(nk, -1, H), ba.reshape(nk, -1, H)
    rdv, r = (qkvz.shape[1] - 2 * dk) // 2, ba.shape[1] // 2
    parts = (qkvz[:, :dk], qkvz[:, dk: 2 * dk], qkvz[:, 2 * dk: 2 * dk + rdv], qkvz[:, 2 * dk + rdv:], ba[:, :r], ba[:, r:])
    return torch.cat([x.reshape(-1, H) for x in parts])


def layout_values(folder):
    layout = open_layout(folder)
    values = {name: dequantize(layout.packed(name)).copy() for name in layout.manifest["tensors"]}
    layout.close()
    return values


@pytest.mark.parametrize("name", ARCHS)
def test_every_source_tensor_is_accounted_for(source, name, tmp_path):
    src = source(name)
    hf = json.loads((src / "config.json").read_text())
    with Checkpoint(src) as ckpt:
        names = set(ckpt.names())
    recipe = arch.for_config(hf)
    plan = recipe.plan(recipe.model_config(hf), names)
    assert plan.used() | plan.skipped == names
    assert plan.used().isdisjoint(plan.skipped)
    if name == "llama4_multimodal":
        assert plan.skipped == {n for n in names if n.startswith(("vision_model.", "multi_modal_projector."))}
    out = convert(src, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tensors"]) == {o.name for o in plan.outs()}
    assert verify(out) == []


@pytest.mark.parametrize("name", ARCHS)
def test_sixteen_bits_keeps_every_value_in_its_place(source, name, tmp_path):
    src = source(name)
    sd = state_dict(src)
    out = convert(src, tmp_path / "out", bits=16)
    manifest = json.loads((out / "manifest.json").read_text())
    for tensor, values in layout_values(out).items():
        expected = reference(name, sd, tensor).numpy()
        np.testing.assert_array_equal(values, expected, err_msg=tensor)
        encoding = manifest["tensors"][tensor]["encoding"]
        assert encoding == ("bf16" if values.ndim == 2 else "f32"), tensor


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_quantized_values_are_the_nearest_their_scales_give(source, name, bits, tmp_path):
    src = source(name)
    exact = layout_values(convert(src, tmp_path / "exact", bits=16))
    out = convert(src, tmp_path / "q", bits=bits, group_size=32)
    layout = open_layout(out)
    quantized = {"q4": 0, "q5": 0, "q6": 0, "q8": 0}
    for tensor, e in layout.manifest["tensors"].items():
        p = layout.packed(tensor)
        got = dequantize(p)
        if e["encoding"] in ("f32", "bf16", "f16"):
            np.testing.assert_array_equal(got, exact[tensor], err_msg=tensor)
            continue
        quantized[e["encoding"]] += 1
        assert_nearest_values(p, exact[tensor])
        is_expert = ".experts." in tensor
        at_4_bits = "q6" if tensor.endswith(".attn.o") else "q5"
        assert e["encoding"] == (f"q{bits}" if is_expert else at_4_bits if bits == 4 else "q8"), tensor
    layout.close()
    assert quantized[f"q{bits}"] > 0
    routers = [t for t in layout.manifest["tensors"] if t.endswith(".router")]
    assert routers and all(layout.manifest["tensors"][t]["encoding"] == "bf16" for t in routers)  # as the source


def test_group_size_64_and_odd_widths(source, tmp_path):
    out = convert(source("mixtral"), tmp_path / "out", bits=4, group_size=64)
    layout = open_layout(out)
    down = layout.manifest["tensors"]["layers.0.experts.0.down"]
    assert down["shape"] == [64, 40] and down["group_size"] == 64
    assert layout.packed("layers.0.experts.0.down").codes.shape == (64, 32)  # 40 columns padded to 64
    layout.close()
    assert verify(out) == []


def test_fp16_source_stays_fp16(source, tmp_path):
    src = source("olmoe", dtype="f16")
    sd = state_dict(src)
    out = convert(src, tmp_path / "out", bits=16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensors"]["layers.0.attn.qkv"]["encoding"] == "f16"
    for tensor, values in layout_values(out).items():
        np.testing.assert_array_equal(values, reference("olmoe", sd, tensor).numpy(), err_msg=tensor)


def crcs(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    return {n: (e["crc32"], e.get("scales_crc32")) for n, e in manifest["tensors"].items()}, manifest


@pytest.mark.parametrize("variant", [{"shards": 3}, {"config_style": "legacy"}])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe", "llama4", "gpt_oss", "qwen3_5_moe", "qwen3_next"])
def test_shards_and_legacy_configs_convert_identically(source, name, variant, tmp_path):
    a, ma = crcs(convert(source(name), tmp_path / "a"))
    b, mb = crcs(convert(source(name, **variant), tmp_path / "b"))
    assert a == b
    assert ma["config"] == mb["config"]


@pytest.mark.parametrize("name, hf_architecture", [("llama4", "Llama4ForConditionalGeneration"),
                                                   ("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration")])
def test_multimodal_layouts_are_their_text_models(source, name, hf_architecture, tmp_path):
    a, ma = crcs(convert(source(name), tmp_path / "a"))
    b, mb = crcs(convert(source(name + "_multimodal"), tmp_path / "b"))
    assert a == b and ma["config"] == mb["config"]
    assert mb["source"]["hf_architecture"] == hf_architecture


def test_mxfp4_experts_decode_to_the_bf16_values(source, tmp_path):
    """make_checkpoint snaps gpt-oss experts to the MXFP4 grid, so both checkpoints hold the same numbers."""
    bf16 = source("gpt_oss", intermediate_size=64)
    packed = source("gpt_oss", intermediate_size=64, mxfp4=True)
    with Checkpoint(packed) as ckpt:
        assert ckpt.info("model.layers.0.mlp.experts.gate_up_proj_blocks").dtype == "U8"
    a = layout_values(convert(bf16, tmp_path / "a16", bits=16))
    b = layout_values(convert(packed, tmp_path / "b16", bits=16))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # -0.0 and +0.0 compare equal
    a4, _ = crcs(convert(bf16, tmp_path / "a4", bits=4))
    b4, _ = crcs(convert(packed, tmp_path / "b4", bits=4))
    assert a4 == b4


def test_config_normalization(source, tmp_path):
    def config(name, **kw):
        out = convert(source(name, **kw), tmp_path / f"{name}{len(kw)}", bits=4)
        return json.loads((out / "manifest.json").read_text())["config"]

    qwen = config("qwen3_moe")
    assert qwen["head_dim"] == 24 and [s["moe"] for s in qwen["layers"]] == [True, False, True]
    assert qwen["layers"][0]["qk_norm"] == "head" and qwen["dense_intermediate_size"] == 96
    assert qwen["norm_topk_prob"] is True and qwen["eos_token_ids"] == [1]
    olmoe = config("olmoe")
    assert olmoe["layers"][0]["qk_norm"] == "full" and olmoe["norm_topk_prob"] is False and olmoe["top_k"] == 3
    llama = config("llama4")
    assert [s["moe"] for s in llama["layers"]] == [False, True, False, True]
    assert [s["rope"] for s in llama["layers"]] == [True, True, True, False]
    assert llama["layers"][1] | {} == {"moe": True, "rope": True, "attention": "chunked", "window": 8,
                                       "qk_norm": "l2", "attn_temperature": False}
    assert llama["layers"][3] | {} == {"moe": True, "rope": False, "attention": "full", "window": 0,
                                       "qk_norm": "none", "attn_temperature": True}
    assert llama["rope"]["kind"] == "llama3" and llama["rope"]["interleaved"] is True
    assert llama["router"] == "sigmoid_topk" and llama["shared_expert_intermediate_size"] == 40
    assert llama["floor_scale"] == 4
    gpt = config("gpt_oss")
    assert [(s["attention"], s["window"]) for s in gpt["layers"]] == [("sliding", 8), ("full", 0), ("sliding", 8)]
    assert gpt["rope"]["kind"] == "yarn" and gpt["rope"]["factor"] == 32 and gpt["rope"]["truncate"] is False
    assert gpt["router"] == "topk_softmax" and gpt["attention_sinks"] and gpt["expert_bias"]
    assert gpt["head_dim"] == 24 and gpt["activation"] == "gpt_oss"
    mix = config("mixtral")
    assert mix["rope"] == mix["rope"] | {"kind": "default", "theta": 1e6} and mix["layers"][0]["attention"] == "full"


def test_manifest_records_tokenizer_quantization_source_and_stats(source, tmp_path):
    src = source("mixtral")
    out = convert(src, tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert m["tokenizer"]["files"] == ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert all((out / f).read_bytes() == (src / f).read_bytes() for f in m["tokenizer"]["files"][1:])
    copied = (out / "tokenizer.json").read_bytes()  # the same JSON, without indentation
    assert json.loads(copied) == json.loads((src / "tokenizer.json").read_bytes()) and b"\n" not in copied
    assert m["tokenizer"] | {} == m["tokenizer"] | {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    assert m["quantization"]["experts"] == "q4" and m["quantization"]["attention"] == "q5"
    assert m["quantization"]["attention_output"] == "q6"
    assert m["quantization"]["router"] == "bf16" and m["quantization"]["norms"] == "f32"
    assert m["source"] == {"id": str(src.resolve()), "revision": None, "hf_architecture": "MixtralForCausalLM"}
    stats = m["stats"]
    assert stats["source_bytes"] == sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert 0.02 < stats["quant_error"]["experts"]["rel_rms"] < 0.15
    assert 0.01 < stats["quant_error"]["other"]["rel_rms"] < 0.06  # q5
    assert stats["worst"]["tensor"].startswith("layers.")


def test_synthetic_checkpoint_small_geometry(tmp_path):
    geometry = dict(num_hidden_layers=2, hidden_size=64, num_experts=4, intermediate_size=40, num_experts_per_tok=2,
                    vocab_size=300, num_attention_heads=4, num_key_value_heads=4)
    src = write_synthetic_checkpoint(tmp_path / "src", geometry, seed=1, shard_bytes=60_000)
    with Checkpoint(src) as ckpt:
        assert len(ckpt.files) > 1 and len(ckpt.names()) == 1 + 2 * (9 + 4 * 3) + 2
        assert ckpt.info("model.layers.1.mlp.experts.3.down_proj.weight").shape == (64, 40)
    out = convert(src, tmp_path / "out")
    assert json.loads((out / "manifest.json").read_text())["config"]["num_experts"] == 4
    assert verify(out) == []


def test_synthetic_qwen3_5_geometry_converts_and_runs(tmp_path):
    """The paging benchmark at Qwen3.5-35B-A3B's scale starts from this generator: its layout must be the Hub's."""
    from moe.convert.synthetic import GEOMETRIES
    from moe.runtime.model import load_model

    geometry = dict(GEOMETRIES["qwen3.5-35b-a3b"], num_hidden_layers=4, hidden_size=64, num_experts=8,
                    moe_intermediate_size=32, shared_expert_intermediate_size=48, vocab_size=300, head_dim=16,
                    num_attention_heads=4, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                    linear_value_head_dim=8)
    src = write_synthetic_checkpoint(tmp_path / "src", geometry, seed=1, shard_bytes=60_000)
    with Checkpoint(src) as ckpt:
        assert len(ckpt.files) > 1
        assert ckpt.info("model.layers.2.linear_attn.in_proj_qkv.weight").shape == (2 * 32 + 32, 64)
        assert ckpt.info("model.layers.3.self_attn.q_proj.weight").shape == (2 * 4 * 16, 64)
    out = convert(src, tmp_path / "out")
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert [layer["attention"] for layer in config["layers"]] == ["linear", "linear", "linear", "full"]
    assert verify(out) == []
    model = load_model(out)
    logits = model.logits(np.random.default_rng(0).integers(0, 300, 20))
    model.close()
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_tokenizer_facts_from_the_various_hub_styles(source, tmp_path):
    from moe.convert.tokenizer_facts import tokenizer_info

    folder = tmp_path / "tok"
    folder.mkdir()
    src = source("mixtral")
    tokenizer = json.loads((src / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                                          {"Sequence": {"id": "A", "type_id": 0}}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    info = tokenizer_info(folder)
    assert info == {"files": ["tokenizer.json", "tokenizer_config.json"], "chat_template": "D", "bos_token": "<s>",
                    "eos_token": "</s>", "add_bos_token": True}
    (folder / "chat_template.jinja").write_text("J")
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": False}))
    info = tokenizer_info(folder)
    assert info["chat_template"] == "J" and info["add_bos_token"] is False
    assert "chat_template.jinja" in info["files"]


def test_synthetic_embed_scale_makes_each_token_route_by_its_own_id(tmp_path):
    """The token-following regime of the paging benchmark: with embeddings 64x larger, a token's experts in
    every layer hardly depend on what came before it; with plain random weights they do."""
    from moe.runtime.model import load_model
    from moe.runtime.routing_stats import routed

    geometry = dict(num_hidden_layers=3, hidden_size=64, num_experts=16, intermediate_size=32, num_experts_per_tok=2,
                    vocab_size=300, num_attention_heads=4, num_key_value_heads=4)
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, 300, size=(12, 6))
    agreement = {}
    for scale in (1, 64):
        src = write_synthetic_checkpoint(tmp_path / f"src{scale}", geometry, seed=1, embed_scale=scale)
        model = load_model(convert(src, tmp_path / f"out{scale}", bits=16))
        # the same last token (7) after different contexts: which experts does it choose, layer by layer?
        chosen = [{layer: frozenset(idx[-1]) for layer, (idx, _) in routed(model, [*ctx, 7]).items()} for ctx in contexts]
        agreement[scale] = np.mean([a[layer] == b[layer] for a, b in zip(chosen, chosen[1:], strict=False) for layer in a])
        model.close()
    assert agreement[64] >= 0.9 and agreement[1] <= 0.6, agreement
