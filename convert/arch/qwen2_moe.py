"""Qwen2-MoE (`Qwen2MoeForCausalLM`; Qwen1.5-MoE too): Qwen3-MoE's names and dense-layer rules without its q/k
norms, biases on q, k and v (not o), and beside the routed experts a shared expert whose output each token
scales by sigmoid(`mlp.shared_expert_gate` x). Softmax over all experts, then top-k, renormalized only with
`norm_topk_prob` (off by default). Sliding-window layers only with `use_sliding_window` (transformers 5's
default `layer_types`: even layers below `max_window_layers`)."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common, qwen3_moe

NAME = "qwen2_moe"
HF_ARCHITECTURES = ("Qwen2MoeForCausalLM",)
MODEL_TYPES = ("qwen2_moe",)


def model_config(hf: dict) -> ModelConfig:
    base = common.base_config(hf, eps=1e-6, max_positions=32768, attention_bias=bool(hf.get("qkv_bias", True)),
                              attention_output_bias=False)
    L = base["num_layers"]
    experts = int(common.get(hf, "num_experts", "num_local_experts", default=60))
    step = int(common.get(hf, "decoder_sparse_step", default=1))
    dense = set(hf.get("mlp_only_layers") or [])
    sliding = bool(hf.get("use_sliding_window"))
    window = int(hf.get("sliding_window") or 0) if sliding else 0
    below = int(common.get(hf, "max_window_layers", default=28))
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < below and sliding else "full_attention"
                                      for i in range(L)]
    if len(types) != L:
        raise common.MoeError(f"config.json: layer_types needs {L} entries, one per layer")

    def spec(i: int) -> LayerSpec:
        moe = i not in dense and experts > 0 and (i + 1) % step == 0
        windowed = types[i] == "sliding_attention" and window > 0
        return LayerSpec(moe=moe, attention="sliding" if windowed else "full", window=window if windowed else 0)

    return ModelConfig(
        architecture=NAME,
        num_experts=experts,
        top_k=int(common.get(hf, "num_experts_per_tok", default=4)),
        expert_intermediate_size=int(common.get(hf, "moe_intermediate_size", default=1408)),
        shared_expert_intermediate_size=int(common.get(hf, "shared_expert_intermediate_size", default=5632)),
        shared_expert_gate=True,
        dense_intermediate_size=int(common.get(hf, "intermediate_size", default=5632)),
        layers=[spec(i) for i in range(L)],
        rope=common.rope(hf, default_theta=1e6),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        **base,
    )


def _layer(cfg: ModelConfig, i: int, p: str):
    """Qwen3-MoE's layer, plus the shared expert and its gate in MoE layers."""
    tensors, experts = qwen3_moe._layer(cfg, i, p)
    if cfg.layers[i].moe:
        mlp, shared = p + "mlp.", p + "mlp.shared_expert."
        tensors += common.swiglu(cfg, i, "shared", shared + "gate_proj.weight", shared + "up_proj.weight",
                                 shared + "down_proj.weight")
        tensors.append(common.tensor(cfg, i, "shared.gate", common.Src(mlp + "shared_expert_gate.weight")))
    return tensors, experts


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    return common.build_plan(cfg, names, _layer)
