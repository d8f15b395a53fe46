"""OLMoE (`OlmoeForCausalLM`): Mixtral with Qwen-style names (`mlp.gate`, `mlp.experts.{j}.*_proj`), q/k RMSNorm
over the whole projection width (before splitting into heads), optional `clip_qkv`, and no top-k renormalization
by default."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common

NAME = "olmoe"
HF_ARCHITECTURES = ("OlmoeForCausalLM",)
MODEL_TYPES = ("olmoe",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, attention_bias=bool(hf.get("attention_bias", False)))
    clip = hf.get("clip_qkv")
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(hf, "num_experts", "num_local_experts", default=64)),
        top_k=int(common.get(hf, "num_experts_per_tok", default=8)),
        expert_intermediate_size=int(common.get(hf, "intermediate_size", default=2048)),
        layers=[LayerSpec(qk_norm="full") for _ in range(base["num_layers"])],
        rope=common.rope(hf, default_theta=10000.0),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        clip_qkv=None if clip is None else float(clip),
        **base,
    )


def _layer(cfg: ModelConfig, i: int, p: str):
    tensors = common.attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
    tensors.append(common.tensor(cfg, i, "router", common.Src(p + "mlp.gate.weight")))
    experts = common.separate_experts(cfg, i, p + "mlp.experts.", "gate_proj.weight", "up_proj.weight",
                                      "down_proj.weight")
    return tensors, experts


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    return common.build_plan(cfg, names, _layer)
