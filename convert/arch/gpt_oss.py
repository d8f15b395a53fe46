"""gpt-oss (`GptOssForCausalLM`).

Differs from Mixtral in: biases on q, k, v, o and one attention-sink logit per head; alternating sliding and
full attention (`layer_types`); yarn RoPE; a router with a bias whose top-k logits are softmaxed among
themselves; clamped SwiGLU `(up + 1) * g * sigmoid(alpha * g)`; experts fused per layer with biases, gate
and up interleaved (gate = rows 0, 2, 4...). bf16 checkpoints store `experts.gate_up_proj` [E, H, 2F] and
`experts.down_proj` [E, F, H] as [in, out]; the Hub's MXFP4 checkpoints store `*_blocks` / `*_scales` as
[out, in].
"""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common

NAME = "gpt_oss"
HF_ARCHITECTURES = ("GptOssForCausalLM",)
MODEL_TYPES = ("gpt_oss",)
_ROPE_DEFAULTS = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                  "original_max_position_embeddings": 4096}


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, head_dim=64, max_positions=131072,
                              attention_bias=bool(hf.get("attention_bias", True)))
    L = base["num_layers"]
    window = int(common.get(hf, "sliding_window", default=0))
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)]
    if len(types) != L:
        raise common.MoeError(f"config.json: layer_types needs {L} entries, one per layer")
    sliding = [t == "sliding_attention" and window > 0 for t in types]
    has_rope = "rope_parameters" in hf or "rope_scaling" in hf
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(hf, "num_local_experts", "num_experts", default=128)),
        top_k=int(common.get(hf, "num_experts_per_tok", "experts_per_token", default=4)),
        expert_intermediate_size=int(common.get(hf, "intermediate_size", default=2880)),
        layers=[LayerSpec(attention="sliding" if s else "full", window=window if s else 0) for s in sliding],
        rope=common.rope(hf, default_theta=150000.0, defaults=None if has_rope else _ROPE_DEFAULTS),
        router="topk_softmax",
        router_bias=True,
        activation="gpt_oss",
        swiglu_limit=float(common.get(hf, "swiglu_limit", default=7.0)),
        swiglu_alpha=float(common.get(hf, "swiglu_alpha", default=1.702)),
        expert_bias=True,
        attention_sinks=True,
        **base,
    )


def _experts(cfg: ModelConfig, i: int, p: str, mxfp4: bool) -> list[list[common.Out]]:
    Src, out = common.Src, common.expert_tensor
    gu, down = p + "gate_up_proj", p + "down_proj"
    t = not mxfp4  # bf16 tensors are [in, out]; MXFP4 blocks are [out, in]
    return [[out(cfg, i, j, "gate_up", Src(gu, j, t, 0, 2, mxfp4), Src(gu, j, t, 1, 2, mxfp4)),
             out(cfg, i, j, "gate_up_bias", Src(gu + "_bias", j, start=0, step=2), Src(gu + "_bias", j, start=1, step=2)),
             out(cfg, i, j, "down", Src(down, j, t, mxfp4=mxfp4)),
             out(cfg, i, j, "down_bias", Src(down + "_bias", j))]
            for j in range(cfg.num_experts)]


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    def layer(cfg: ModelConfig, i: int, p: str):
        tensors = common.attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
        tensors += [common.tensor(cfg, i, "router", common.Src(p + "mlp.router.weight")),
                    common.tensor(cfg, i, "router_bias", common.Src(p + "mlp.router.bias"))]
        mxfp4 = p + "mlp.experts.gate_up_proj_blocks" in names
        return tensors, _experts(cfg, i, p + "mlp.experts.", mxfp4)

    return common.build_plan(cfg, names, layer)
