"""Qwen3-MoE (`Qwen3MoeForCausalLM`): OLMoE's tensor names, q/k RMSNorm per head (weight [head_dim]), an explicit
head_dim, and dense SwiGLU layers (`mlp.gate_proj/up_proj/down_proj`) wherever a layer is in `mlp_only_layers` or
off the `decoder_sparse_step` grid. Hub configs call the expert count `num_experts`, transformers 5
`num_local_experts`."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common

NAME = "qwen3_moe"
HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)
MODEL_TYPES = ("qwen3_moe",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, eps=1e-6, max_positions=32768,
                              attention_bias=bool(hf.get("attention_bias", False)))
    experts = int(common.get(hf, "num_local_experts", "num_experts", default=128))
    step = int(common.get(hf, "decoder_sparse_step", default=1))
    dense = set(hf.get("mlp_only_layers") or [])
    window = int(hf.get("sliding_window") or 0) if hf.get("use_sliding_window") else 0

    def spec(i: int) -> LayerSpec:
        moe = i not in dense and experts > 0 and (i + 1) % step == 0
        return LayerSpec(moe=moe, qk_norm="head", attention="sliding" if window else "full", window=window)

    return ModelConfig(
        architecture=NAME,
        num_experts=experts,
        top_k=int(common.get(hf, "num_experts_per_tok", default=8)),
        expert_intermediate_size=int(common.get(hf, "moe_intermediate_size", default=768)),
        dense_intermediate_size=int(common.get(hf, "intermediate_size", default=6144)),
        layers=[spec(i) for i in range(base["num_layers"])],
        rope=common.rope(hf, default_theta=10000.0),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        **base,
    )


def _layer(cfg: ModelConfig, i: int, p: str):
    tensors = common.attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
    mlp = p + "mlp."
    if not cfg.layers[i].moe:
        tensors += common.swiglu(cfg, i, "mlp", mlp + "gate_proj.weight", mlp + "up_proj.weight",
                                 mlp + "down_proj.weight")
        return tensors, []
    tensors.append(common.tensor(cfg, i, "router", common.Src(mlp + "gate.weight")))
    experts = common.separate_experts(cfg, i, mlp + "experts.", "gate_proj.weight", "up_proj.weight",
                                      "down_proj.weight")
    return tensors, experts


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    return common.build_plan(cfg, names, _layer)
