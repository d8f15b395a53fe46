"""GLM-4.5 (`Glm4MoeForCausalLM`; GLM-4.5-Air too): Qwen3-MoE's tensor names with GQA attention biased on q, k
and v (`attention_bias`; o never), q/k RMSNorm per head only with `use_qk_norm`, and partial RoPE: each head's
first hd * `partial_rotary_factor` dims (0.5 unless the config says) rotated in halves, the rest passed through.
Layers below `first_k_dense_replace` are dense SwiGLU MLPs of `intermediate_size`; the others hold
`n_routed_experts` experts of `moe_intermediate_size` beside `n_shared_experts` shared ones, stored as one SwiGLU
(`mlp.shared_experts.*`, width n_shared * moe_intermediate_size) added unscaled. The router (`mlp.gate.weight`,
f32) is sigmoid_group_topk: sigmoid scores plus `mlp.gate.e_score_correction_bias` choose the experts (the
`topk_group` best of `n_group` groups, each rated by its best two, then the top-k), the uncorrected scores weigh
them, renormalized with `norm_topk_prob`, times `routed_scaling_factor`. Hub checkpoints carry the multi-token
prediction layer(s) (`model.layers.{num_hidden_layers}.*`, with `eh_proj`, `enorm`, `hnorm`, `shared_head`),
which transformers ignores and so do we."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common, qwen3_moe

NAME = "glm4_moe"
HF_ARCHITECTURES = ("Glm4MoeForCausalLM",)
MODEL_TYPES = ("glm4_moe",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, eps=1e-5, max_positions=131072, attention_bias=bool(hf.get("attention_bias", False)),
                              attention_output_bias=False)
    L = base["num_layers"]
    experts = int(common.get(hf, "n_routed_experts", "num_local_experts", default=128))
    first_moe = int(common.get(hf, "first_k_dense_replace", default=1))
    qk_norm = "head" if hf.get("use_qk_norm") else "none"
    rope = common.rope(hf, default_theta=10000.0)
    rope.partial_rotary_factor = float(common.get(hf.get("rope_parameters") or {}, "partial_rotary_factor",
                                                  default=common.get(hf, "partial_rotary_factor", default=0.5)))
    shared = int(common.get(hf, "n_shared_experts", default=1))
    width = int(common.get(hf, "moe_intermediate_size", default=1408))
    return ModelConfig(
        architecture=NAME,
        num_experts=experts,
        top_k=int(common.get(hf, "num_experts_per_tok", default=8)),
        expert_intermediate_size=width,
        shared_expert_intermediate_size=shared * width,
        dense_intermediate_size=int(common.get(hf, "intermediate_size", default=10944)),
        layers=[LayerSpec(moe=i >= first_moe, qk_norm=qk_norm) for i in range(L)],
        rope=rope,
        **group_router(hf),
        **base,
    )


def group_router(hf: dict) -> dict:
    """The sigmoid group-limited router's ModelConfig fields (DeepSeek-V3 routes the same way)."""
    return dict(router="sigmoid_group_topk", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                n_group=int(common.get(hf, "n_group", default=1)), topk_group=int(common.get(hf, "topk_group", default=1)),
                routed_scaling_factor=float(common.get(hf, "routed_scaling_factor", default=1.0)))


def _layer(cfg: ModelConfig, i: int, p: str):
    """Qwen3-MoE's layer, plus the router's correction and the shared experts in MoE layers."""
    tensors, experts = qwen3_moe._layer(cfg, i, p)
    if cfg.layers[i].moe:
        mlp = p + "mlp."
        tensors.append(common.tensor(cfg, i, "router_correction", common.Src(mlp + "gate.e_score_correction_bias")))
        if cfg.shared_expert_intermediate_size:
            shared = mlp + "shared_experts."
            tensors += common.swiglu(cfg, i, "shared", shared + "gate_proj.weight", shared + "up_proj.weight",
                                     shared + "down_proj.weight")
    return tensors, experts


def mtp_layers(names: set[str]) -> set[str]:
    """The multi-token prediction layers after the last one, known by their `eh_proj` (so weights of more layers
    than config.json says still fail the check)."""
    mtp = tuple(n.removesuffix("eh_proj.weight") for n in names
                if n.startswith("model.layers.") and n.endswith(".eh_proj.weight"))
    return {n for n in names if n.startswith(mtp)}


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    """Skipped: the multi-token prediction layers."""
    return common.build_plan(cfg, names, _layer, skipped=mtp_layers(names))
