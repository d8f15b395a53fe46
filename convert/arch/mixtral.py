"""Mixtral (`MixtralForCausalLM`): the baseline. Softmax router over all experts, top-k renormalized;
experts stored one tensor each as `block_sparse_moe.experts.{j}.w1` (gate), `w3` (up), `w2` (down)."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common

NAME = "mixtral"
HF_ARCHITECTURES = ("MixtralForCausalLM",)
MODEL_TYPES = ("mixtral",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, max_positions=131072)
    window = hf.get("sliding_window") or 0
    spec = LayerSpec(attention="sliding" if window else "full", window=window)
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(hf, "num_local_experts", "num_experts", default=8)),
        top_k=int(common.get(hf, "num_experts_per_tok", default=2)),
        expert_intermediate_size=int(common.get(hf, "intermediate_size", default=14336)),
        layers=[LayerSpec(**vars(spec)) for _ in range(base["num_layers"])],
        rope=common.rope(hf, default_theta=1e6),
        router="softmax_topk",
        norm_topk_prob=True,
        **base,
    )


def _layer(cfg: ModelConfig, i: int, p: str):
    moe = p + "block_sparse_moe."
    tensors = common.attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
    tensors.append(common.tensor(cfg, i, "router", common.Src(moe + "gate.weight")))
    return tensors, common.separate_experts(cfg, i, moe + "experts.", "w1.weight", "w3.weight", "w2.weight")


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    return common.build_plan(cfg, names, _layer)
