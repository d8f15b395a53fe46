"""Qwen3-Next (`Qwen3NextForCausalLM`): Qwen3.5-MoE's hybrid layers (Gated DeltaNet and gated full attention, RMSNorms
scaling by 1 + weight) with two differences. The linear attention's input projections are grouped by key head:
`in_proj_qkvz` [nk (2 dk + 2 r dv), H] holds, for each key head, its q and k rows (dk each), then the v and z rows of
its r = nv / nk value heads; `in_proj_ba` [nk 2 r, H] its value heads' b rows, then their a rows. And the MLP is
Qwen3-MoE's rule: dense SwiGLU (`intermediate_size`) for layers in `mlp_only_layers` or off the
`decoder_sparse_step` grid, else MoE with a gated shared expert; the router renormalizes only with
`norm_topk_prob` (true by default)."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common, qwen3_5_moe

NAME = "qwen3_next"
HF_ARCHITECTURES = ("Qwen3NextForCausalLM",)
MODEL_TYPES = ("qwen3_next",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, eps=1e-6, max_positions=32768, head_dim=256,
                              attention_bias=bool(hf.get("attention_bias", False)))
    L = base["num_layers"]
    experts = int(common.get(hf, "num_experts", "num_local_experts", default=512))
    step = int(common.get(hf, "decoder_sparse_step", default=1))
    dense = set(hf.get("mlp_only_layers") or [])

    def spec(i: int, kind: str) -> LayerSpec:
        moe = i not in dense and experts > 0 and (i + 1) % step == 0
        return LayerSpec(moe=moe, attention=kind, qk_norm="none" if kind == "linear" else "head")

    return ModelConfig(
        architecture=NAME,
        num_experts=experts,
        top_k=int(common.get(hf, "num_experts_per_tok", default=10)),
        expert_intermediate_size=int(common.get(hf, "moe_intermediate_size", default=512)),
        shared_expert_intermediate_size=int(common.get(hf, "shared_expert_intermediate_size", default=512)),
        shared_expert_gate=True,
        dense_intermediate_size=int(common.get(hf, "intermediate_size", default=5632)),
        layers=[spec(i, kind) for i, kind in enumerate(qwen3_5_moe.attention_kinds(hf, L))],
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        **qwen3_5_moe.hybrid_attention(hf),
        **base,
    )


def _projections(cfg: ModelConfig, i: int, a: str) -> tuple[common.Src, ...]:
    """linear.in's rows (all q, all k, all v, all z, all b, all a) picked from the per-key-head groups."""
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // cfg.linear_num_key_heads
    group = 2 * dk + 2 * r * dv  # one key head's rows of in_proj_qkvz
    qkvz, ba = a + "in_proj_qkvz.weight", a + "in_proj_ba.weight"
    return (common.Src(qkvz, start=0, step=group, block=dk), common.Src(qkvz, start=dk, step=group, block=dk),
            common.Src(qkvz, start=2 * dk, step=group, block=r * dv),
            common.Src(qkvz, start=2 * dk + r * dv, step=group, block=r * dv),
            common.Src(ba, start=0, step=2 * r, block=r), common.Src(ba, start=r, step=2 * r, block=r))


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    """Skipped: the multi-token prediction layer (`mtp.*`) of the Hub's checkpoints."""
    def each(cfg: ModelConfig, i: int, p: str):
        return qwen3_5_moe.layer(cfg, i, p, names, _projections)

    return common.build_plan(cfg, names, each, skipped={n for n in names if n.startswith("mtp.")})
