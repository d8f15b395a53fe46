"""Tiny random checkpoints of every architecture, in the Hugging Face Hub layout, built by transformers itself.

`make_checkpoint(arch, folder)` creates the model from a small config, fills it with seeded random
weights scaled so logits and routing are far from uniform, and saves it with `save_pretrained`,
so tensor names, dtypes and config keys are exactly what transformers writes. The geometry
exercises the traps: windows and chunks of 8 tokens, head_dim != hidden / heads (Qwen3-MoE,
gpt-oss), a dense layer (Qwen3-MoE, Llama 4), a NoPE layer (Llama 4), expert width 40 (not a
multiple of 32). The same folder loads with `AutoModelForCausalLM.from_pretrained(folder)`
(except the `*_multimodal` ones, whose layouts are the Hub's, and `mxfp4=True`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from moe.convert.demo import DEMO_SOURCE

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ARCHS = ("mixtral", "qwen3_moe", "olmoe", "llama4", "llama4_multimodal", "gpt_oss", "qwen2_moe", "glm4_moe",
         "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "qwen3_5_moe", "qwen3_5_moe_multimodal", "qwen3_next")
MODELS = tuple(a for a in ARCHS if not a.endswith("_multimodal"))  # one per architecture: llama4 is llama4_multimodal's

_COMMON = dict(
    vocab_size=4096, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
    max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=3, tie_word_embeddings=False,
)
_CONFIGS = {
    "mixtral": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, intermediate_size=40,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "qwen3_moe": dict(num_hidden_layers=3, head_dim=24, num_local_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=40, intermediate_size=96, mlp_only_layers=[1], decoder_sparse_step=1,
                      norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "olmoe": dict(num_hidden_layers=2, num_experts=8, num_experts_per_tok=3, intermediate_size=40,
                  norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # layers: 0 dense + RoPE, 1 MoE + RoPE, 2 dense + RoPE, 3 MoE + NoPE (full attention, temperature tuning)
    "llama4": dict(num_hidden_layers=4, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                   intermediate_size=40, intermediate_size_mlp=96, interleave_moe_layer_step=2,
                   no_rope_layer_interval=4, attention_chunk_size=8, floor_scale=4, attn_scale=0.1,
                   attn_temperature_tuning=True, use_qk_norm=True,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # layers: 0 MoE with a shared expert and its gate, 1 dense, 2 MoE
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                      shared_expert_intermediate_size=48, intermediate_size=96, mlp_only_layers=[1],
                      decoder_sparse_step=1, norm_topk_prob=False, qkv_bias=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # layers: 0 dense, 1-2 MoE (4 groups of 2 experts, the best 2 groups kept, 3 experts per token, scaled 2.5) with
    # two shared experts; q/k norms; RoPE on half of each head (12 of 24 dims)
    "glm4_moe": dict(num_hidden_layers=3, head_dim=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                     topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=2,
                     moe_intermediate_size=40, intermediate_size=96, first_k_dense_replace=1, attention_bias=True,
                     use_qk_norm=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
    # layers: 0 dense, 1-2 MoE routed as GLM-4.5's; latent attention: q through rank 24, a latent of 32 dims,
    # heads of 16 unrotated + 8 rotated (interleaved) q/k dims and 20 v dims; yarn RoPE with mscale_all_dim
    "deepseek_v3": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1, moe_intermediate_size=40,
                        intermediate_size=96, first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=20, rope_interleave=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "original_max_position_embeddings": 128}),
    # DeepSeek-V3's geometry with one q matrix, default RoPE, softmax routing within the 2 best of 4 groups (the full
    # DeepSeek-V2's group_limited_greedy; V2-Lite's greedy is a variant in test_fidelity), scaled by 1.5
    "deepseek_v2": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
                        routed_scaling_factor=1.5, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        n_shared_experts=2, moe_intermediate_size=40,
                        intermediate_size=96, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=20,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
    # GLM-4.7-Flash: DeepSeek-V3's layers and attention with one group of experts (4 per token, scaled 1.8), v heads
    # wider than the unrotated q/k part (24 and 12 dims), default RoPE (theta 1e6)
    "glm4_moe_lite": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=4,
                          routed_scaling_factor=1.8, norm_topk_prob=True, n_shared_experts=1, moe_intermediate_size=40,
                          intermediate_size=96, q_lora_rank=16, kv_lora_rank=32, qk_nope_head_dim=12,
                          qk_rope_head_dim=8, v_head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # layers: 0-2 Gated DeltaNet (2 key heads of 16, 4 value heads of 24, 4 taps), 3 gated full attention (RoPE on 8
    # of 32 dims); every layer MoE with a gated shared expert
    "qwen3_5_moe": dict(num_hidden_layers=4, head_dim=32, num_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=40, shared_expert_intermediate_size=48, linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
                        linear_conv_kernel_dim=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}),
    # Qwen3.5-MoE's geometry with layer 1 dense and the router not renormalized
    "qwen3_next": dict(num_hidden_layers=4, head_dim=32, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=40, shared_expert_intermediate_size=48, intermediate_size=96,
                       mlp_only_layers=[1], decoder_sparse_step=1, norm_topk_prob=False, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=24,
                       linear_conv_kernel_dim=4,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}),
    "gpt_oss": dict(num_hidden_layers=3, head_dim=24, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=40, sliding_window=8, max_position_embeddings=131072,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096}),
}
_CLASSES = {  # arch -> (config class, model class) names in transformers
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM"),
    "qwen3_5_moe": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM"),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM"),
}
FP4_VALUES = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0.0, -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def tiny_config(arch: str, **overrides) -> dict:
    """The transformers config kwargs make_checkpoint uses for `arch` (the text part for the multimodal ones)."""
    base = arch.removesuffix("_multimodal")
    if base not in _CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; one of {ARCHS}")
    return {**_COMMON, **_CONFIGS[base], **overrides}


def build_model(arch: str, seed: int = 0, **config_overrides):
    """The transformers model (float32, eval mode) make_checkpoint saves for these arguments."""
    import torch
    import transformers

    base = arch.removesuffix("_multimodal")
    kwargs = tiny_config(arch, **config_overrides)
    config_cls, model_cls = (getattr(transformers, n) for n in _CLASSES[base])
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _randomize(model, seed)
    if base == "gpt_oss" and _mxfp4_fits(config):
        _snap_experts_to_mxfp4(model)
    return model


def _randomize(model, seed: int) -> None:
    """Weights with unit-scale outputs: N(0, 1/fan_in) matrices, norms scaling by about 1, biases and sinks non-zero."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):  # decays of 2-6 % a token: a state that outlasts a chunk
                p.copy_(-3.0 + 0.5 * r)
            elif p.ndim == 1 and "norm" in name:  # zero at init: a norm that scales by 1 + weight (Qwen3.5)
                p.copy_((0.0 if bool((p == 0).all()) else 1.0) + 0.2 * r)
            elif p.ndim == 1 and name.endswith("sinks"):
                p.copy_(r)
            elif p.ndim == 1 or name.endswith("_bias"):
                p.copy_(0.2 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            elif p.ndim == 3:  # fused experts (E, in, out)
                p.copy_(r / math.sqrt(p.shape[1]))
            elif "router" in name or name.endswith("gate.weight"):
                p.copy_(2.0 * r / math.sqrt(p.shape[1]))  # routers with clear preferences
            elif "lm_head" in name:
                p.copy_(3.0 * r / math.sqrt(p.shape[1]))
            else:
                p.copy_(r / math.sqrt(p.shape[1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # GLM's router correction: a buffer, zeros at init
                b.copy_(0.2 * torch.randn(b.shape, generator=g))


def _mxfp4_fits(config) -> bool:
    return config.hidden_size % 32 == 0 and config.intermediate_size % 32 == 0


def _snap_experts_to_mxfp4(model) -> None:
    """Round gpt-oss experts to MXFP4 values, so the bf16 and MXFP4 checkpoints of one seed hold the same numbers."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_up_proj", "down_proj"):
                p = getattr(layer.mlp.experts, name)  # (E, in, out)
                w = p.detach().numpy().transpose(0, 2, 1)  # (E, out, in)
                blocks, scales = mxfp4_encode(w)
                p.copy_(torch.from_numpy(mxfp4_decode(blocks, scales).transpose(0, 2, 1).copy()))


def mxfp4_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(E, out, in) float -> blocks (E, out, in/32, 16) uint8 (low nibble = even element), scales (E, out, in/32) uint8."""
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // 32, 32).astype(np.float32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
    scaled = groups / np.exp2(exp)
    codes = np.abs(scaled[..., None] - FP4_VALUES[:8]).argmin(axis=-1).astype(np.uint8)
    codes |= np.where(scaled < 0, 8, 0).astype(np.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp[..., 0] + 127).astype(np.uint8)


def mxfp4_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of mxfp4_encode: (E, out, in) float32."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    values = FP4_VALUES[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return values.reshape(*values.shape[:-2], -1)


def make_checkpoint(arch: str, folder, *, dtype: str = "bf16", shards: int = 1, config_style: str = "v5",
                    mxfp4: bool = False, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random checkpoint of `arch` in the Hub layout into `folder`; returns the folder.

    dtype: bf16 | f16 | f32. shards > 1 splits the weights into that many files plus
    model.safetensors.index.json. config_style "legacy" writes rope_theta / rope_scaling at the top
    level (and Qwen3-MoE's `num_experts`), as older Hub repos do. mxfp4 (gpt_oss only; hidden and
    intermediate sizes multiples of 32) stores the experts as the Hub does: `*_blocks` / `*_scales`.
    The config dict used is in folder/config.json (see also `tiny_config`).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed, **config_overrides)
    if mxfp4 and (arch != "gpt_oss" or not _mxfp4_fits(model.config)):
        raise ValueError("mxfp4 needs arch gpt_oss with hidden and intermediate sizes multiples of 32")
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    model.to(torch_dtype).save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_SOURCE / name, folder / name)  # the bundled demo's tokenizer
    tensors = _read_all(folder)
    config = json.loads((folder / "config.json").read_text())
    if mxfp4:
        tensors = _to_mxfp4(tensors)
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                       "lm_head"],
        }
    if arch == "llama4_multimodal":
        tensors, config = _multimodal(tensors, config, torch_dtype)
    if arch == "qwen3_5_moe_multimodal":
        tensors, config = _qwen3_5_multimodal(tensors, config, torch_dtype)
    if arch in ("glm4_moe", "deepseek_v3", "glm4_moe_lite"):
        tensors.update(_mtp_layer(config, torch_dtype))
    if config_style == "legacy":
        config = _legacy(config)
    elif config_style != "v5":
        raise ValueError(f"config_style must be v5 or legacy, not {config_style!r}")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_shards(folder, tensors, shards)
    return folder


def _read_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def _write_shards(folder: Path, tensors: dict, shards: int) -> None:
    from safetensors.torch import save_file

    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s * per: (s + 1) * per]}
        save_file(part, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _to_mxfp4(tensors: dict) -> dict:
    import torch

    out = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = t.float().numpy().transpose(0, 2, 1)  # (E, in, out) -> (E, out, in)
            blocks, scales = mxfp4_encode(w)
            out[name + "_blocks"] = torch.from_numpy(np.ascontiguousarray(blocks))
            out[name + "_scales"] = torch.from_numpy(np.ascontiguousarray(scales))
        else:
            out[name] = t
    return out


def _multimodal(tensors: dict, text_config: dict, torch_dtype) -> tuple[dict, dict]:
    """The Hub's Llama4ForConditionalGeneration layout around the text model, with a token vision tower."""
    import torch

    out = {"language_model." + name: t for name, t in tensors.items()}
    g = torch.Generator().manual_seed(1)
    out["vision_model.patch_embedding.linear.weight"] = torch.randn(32, 48, generator=g).to(torch_dtype)
    out["vision_model.layernorm_pre.weight"] = torch.ones(32, dtype=torch_dtype)
    out["multi_modal_projector.linear_1.weight"] = torch.randn(64, 32, generator=g).to(torch_dtype)
    text_config = dict(text_config, architectures=None)
    config = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text_config,
        "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 32, "num_hidden_layers": 1,
                          "image_size": 28, "patch_size": 4},
        "boi_token_index": 4000, "eoi_token_index": 4001, "image_token_index": 4002,
        "tie_word_embeddings": False,
        "transformers_version": text_config.get("transformers_version"),
    }
    return out, config


def _qwen3_5_multimodal(tensors: dict, text_config: dict, torch_dtype) -> tuple[dict, dict]:
    """The Hub's Qwen3_5MoeForConditionalGeneration layout: the text model under `model.language_model.` with its
    experts fused ([E, 2F, H] gate then up rows, [E, H, F]), a token vision tower and multi-token prediction layer."""
    import torch

    out, experts = {}, {}
    for name, t in tensors.items():
        parts = name.split(".")  # model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight
        if parts[3:5] == ["mlp", "experts"]:
            experts.setdefault(int(parts[2]), {})[int(parts[5]), parts[6]] = t
        else:
            out[name.replace("model.", "model.language_model.", 1)] = t
    for i, weights in experts.items():
        p, E = f"model.language_model.layers.{i}.mlp.experts.", len(weights) // 3
        out[p + "gate_up_proj"] = torch.stack([torch.cat([weights[j, "gate_proj"], weights[j, "up_proj"]])
                                               for j in range(E)])
        out[p + "down_proj"] = torch.stack([weights[j, "down_proj"] for j in range(E)])
    g = torch.Generator().manual_seed(1)
    out["model.visual.patch_embed.proj.weight"] = torch.randn(32, 48, generator=g).to(torch_dtype)
    out["mtp.fc.weight"] = torch.randn(64, 128, generator=g).to(torch_dtype)
    text = dict(text_config, architectures=None, model_type="qwen3_5_moe_text")
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[2, 1, 1], mrope_interleaved=True)
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision", "hidden_size": 32, "depth": 1, "out_hidden_size": 64},
        "tie_word_embeddings": False,
        "transformers_version": text_config.get("transformers_version"),
    }
    return out, config


def _mtp_layer(config: dict, torch_dtype) -> dict:
    """The Hub's multi-token prediction layer after the last (GLM-4.5-Air's 46, GLM-4.7-Flash's 47, DeepSeek-V3's 61), which transformers
    ignores: a few of its tensors, enough to be recognized."""
    import torch

    H, p = config["hidden_size"], f"model.layers.{config['num_hidden_layers']}."
    g = torch.Generator().manual_seed(2)
    shapes = {"eh_proj.weight": (H, 2 * H), "enorm.weight": (H,), "hnorm.weight": (H,),
              "shared_head.norm.weight": (H,), "input_layernorm.weight": (H,)}
    return {p + name: torch.randn(shape, generator=g).to(torch_dtype) for name, shape in shapes.items()}


def _legacy(config: dict) -> dict:
    """Rewrite a transformers-5 config the way older Hub repos have it."""
    if "text_config" in config:
        return dict(config, text_config=_legacy(config["text_config"]))
    config = dict(config)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:  # GLM-4.5's Hub configs keep it at the top level
        config["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    if config["model_type"] == "qwen3_moe":
        config["num_experts"] = config.pop("num_local_experts")
    if config["model_type"] == "llama4_text":
        for key in ("layer_types", "moe_layers"):  # derived from no_rope_layers and interleave_moe_layer_step
            config.pop(key, None)
        config["no_rope_layers"] = []  # Scout's config: empty means every no_rope_layer_interval-th layer
    return config
