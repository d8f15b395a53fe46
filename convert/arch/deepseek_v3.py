"""DeepSeek-V3 (`DeepseekV3ForCausalLM`, and GLM-4.7-Flash's `Glm4MoeLiteForCausalLM`, the same model): GLM-4.5's
layers (sigmoid group-limited router with its correction, shared experts, the first `first_k_dense_replace` layers
dense) around multi-head latent attention (attention_kind mla). Its q comes through `q_a_proj`, `q_a_layernorm`,
`q_b_proj` (or one `q_proj` when `q_lora_rank` is null); `kv_a_proj_with_mqa` gives a latent of `kv_lora_rank` dims,
normalized by `kv_a_layernorm`, and a key part of `qk_rope_head_dim` dims shared by all heads, the only dims RoPE
rotates (pairs (x0, x1) with `rope_interleave`); `kv_b_proj` expands the latent into each head's k_nope and v. The
softmax scale is (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times yarn's mscale(factor, mscale_all_dim) squared
under yarn RoPE. Hub checkpoints carry the multi-token prediction layer(s), skipped as GLM-4.5's are."""

from __future__ import annotations

import math

from ...runtime.config import LayerSpec, ModelConfig
from ...runtime.errors import MoeError
from . import common, glm4_moe

NAME = "deepseek_v3"
HF_ARCHITECTURES = ("DeepseekV3ForCausalLM", "Glm4MoeLiteForCausalLM")
MODEL_TYPES = ("deepseek_v3", "glm4_moe_lite")


def _mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def model_config(hf: dict) -> ModelConfig:
    if hf.get("attention_bias"):
        raise MoeError("config.json: attention_bias is not supported for latent attention (no DeepSeek model has it)")
    rope_dim = int(common.get(hf, "qk_rope_head_dim", default=64))
    base = common.base_config(hf, eps=1e-6, max_positions=4096)
    base.update(head_dim=rope_dim, num_kv_heads=1)  # the heads share one cached latent, as MQA shares one kv head
    L = base["num_layers"]
    rope = common.rope(hf, default_theta=10000.0, interleaved=bool(hf.get("rope_interleave", True)))
    rope.partial_rotary_factor = float((hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    nope = int(common.get(hf, "qk_nope_head_dim", default=128))
    scale = (nope + rope_dim) ** -0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        scale *= _mscale(rope.factor, rope.mscale_all_dim) ** 2
    lite = hf.get("model_type") == "glm4_moe_lite"
    first_moe = int(common.get(hf, "first_k_dense_replace", default=1 if lite else 3))
    kinds = hf.get("mlp_layer_types") or ["dense" if i < first_moe else "sparse" for i in range(L)]
    if len(kinds) != L:
        raise MoeError(f"config.json: mlp_layer_types names {len(kinds)} layers, not num_hidden_layers {L}")
    width = int(common.get(hf, "moe_intermediate_size", default=2048))
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(hf, "n_routed_experts", "num_local_experts", default=256)),
        top_k=int(common.get(hf, "num_experts_per_tok", default=8)),
        expert_intermediate_size=width,
        shared_expert_intermediate_size=int(common.get(hf, "n_shared_experts", default=1)) * width,
        dense_intermediate_size=int(common.get(hf, "intermediate_size", default=18432)),
        layers=[LayerSpec(moe=kind == "sparse") for kind in kinds],
        rope=rope,
        **glm4_moe.group_router(hf),
        attention_kind="mla",
        q_lora_rank=int(hf.get("q_lora_rank", 1536) or 0),  # null: one q matrix
        kv_lora_rank=int(common.get(hf, "kv_lora_rank", default=512)),
        qk_nope_head_dim=nope,
        v_head_dim=int(common.get(hf, "v_head_dim", default=128)),
        attention_scale=scale,
        **base,
    )


def attention(cfg: ModelConfig, i: int, a: str) -> list[common.Out]:
    """Layer i's latent attention tensors from `{a}q_a_proj.weight` etc."""
    def t(short: str, src: str) -> common.Out:
        return common.tensor(cfg, i, short, common.Src(a + src))

    q = ([t("attn.q_a", "q_a_proj.weight"), t("attn.q_a_norm", "q_a_layernorm.weight"), t("attn.q_b", "q_b_proj.weight")]
         if cfg.q_lora_rank else [t("attn.q", "q_proj.weight")])
    return q + [t("attn.kv_a", "kv_a_proj_with_mqa.weight"), t("attn.kv_a_norm", "kv_a_layernorm.weight"),
                t("attn.kv_b", "kv_b_proj.weight"), t("attn.o", "o_proj.weight")]


def _layer(cfg: ModelConfig, i: int, p: str):
    """Latent attention, then GLM-4.5's MLP or MoE block."""
    tensors = attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
    mlp = p + "mlp."
    if not cfg.layers[i].moe:
        return tensors + common.swiglu(cfg, i, "mlp", mlp + "gate_proj.weight", mlp + "up_proj.weight",
                                       mlp + "down_proj.weight"), []
    tensors.append(common.tensor(cfg, i, "router", common.Src(mlp + "gate.weight")))
    if cfg.router == "sigmoid_group_topk":  # DeepSeek-V2 routes by softmax, without a correction
        tensors.append(common.tensor(cfg, i, "router_correction", common.Src(mlp + "gate.e_score_correction_bias")))
    if cfg.shared_expert_intermediate_size:
        shared = mlp + "shared_experts."
        tensors += common.swiglu(cfg, i, "shared", shared + "gate_proj.weight", shared + "up_proj.weight",
                                 shared + "down_proj.weight")
    experts = common.separate_experts(cfg, i, mlp + "experts.", "gate_proj.weight", "up_proj.weight",
                                      "down_proj.weight")
    return tensors, experts


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    """Skipped, as GLM-4.5's: the multi-token prediction layers after the last one."""
    return common.build_plan(cfg, names, _layer, skipped=glm4_moe.mtp_layers(names))
