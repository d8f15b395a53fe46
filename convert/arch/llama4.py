"""Llama 4 text (`Llama4ForCausalLM`, and the text half of the Hub's `Llama4ForConditionalGeneration`).

Differs from Mixtral in: interleaved RoPE with llama3 scaling; NoPE layers (`no_rope_layers[i] == 0`) with
full attention and attention temperature tuning, RoPE layers with chunked attention and an L2 q/k norm;
MoE only on `moe_layers` (dense `feed_forward.*_proj` elsewhere, width `intermediate_size_mlp`); a sigmoid
router whose score scales the expert's input; a shared expert; experts fused per layer as
`experts.gate_up_proj` [E, H, 2F] and `experts.down_proj` [E, F, H], both [in, out].
Multimodal repos keep the text config under `text_config` and the weights under `language_model.`.
"""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from . import common

NAME = "llama4"
HF_ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
MODEL_TYPES = ("llama4_text", "llama4")
# (text prefix, lm_head name, skipped prefixes) of the multimodal layouts: the Hub's, and transformers 5's
_MULTIMODAL = (
    ("language_model.model.", "language_model.lm_head.weight", ("vision_model.", "multi_modal_projector.")),
    ("model.language_model.", "lm_head.weight", ("model.vision_model.", "model.multi_modal_projector.")),
)


def text_config(hf: dict) -> dict:
    return hf["text_config"] if isinstance(hf.get("text_config"), dict) else hf


def model_config(hf: dict) -> ModelConfig:
    tc = text_config(hf)
    base = common.base_config(tc, head_dim=128, max_positions=131072,
                              attention_bias=bool(tc.get("attention_bias", False)))
    L = base["num_layers"]
    step = int(common.get(tc, "interleave_moe_layer_step", default=1))
    moe_layers = tc.get("moe_layers")
    moe_layers = set(range(step - 1, L, step) if moe_layers is None else moe_layers)
    interval = int(common.get(tc, "no_rope_layer_interval", default=4))
    uses_rope = tc.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
    layer_types = tc.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in uses_rope]
    chunk = int(common.get(tc, "attention_chunk_size", default=0))
    qk_norm = bool(tc.get("use_qk_norm", True))
    tuning = bool(tc.get("attn_temperature_tuning", True))
    if len(uses_rope) != L or len(layer_types) != L:
        raise common.MoeError(f"config.json: no_rope_layers / layer_types need {L} entries, one per layer")

    def spec(i: int) -> LayerSpec:
        rope = bool(uses_rope[i])
        chunked = layer_types[i] == "chunked_attention" and chunk > 0
        return LayerSpec(moe=i in moe_layers, rope=rope, attention="chunked" if chunked else "full",
                         window=chunk if chunked else 0, qk_norm="l2" if qk_norm and rope else "none",
                         attn_temperature=tuning and not rope)

    F = int(common.get(tc, "intermediate_size", default=8192))
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(tc, "num_local_experts", default=16)),
        top_k=int(common.get(tc, "num_experts_per_tok", default=1)),
        expert_intermediate_size=F,
        shared_expert_intermediate_size=F,
        dense_intermediate_size=int(common.get(tc, "intermediate_size_mlp", default=16384)),
        layers=[spec(i) for i in range(L)],
        rope=common.rope(tc, default_theta=500000.0, interleaved=True),
        router="sigmoid_topk",
        norm_topk_prob=False,
        attn_scale=float(common.get(tc, "attn_scale", default=0.1)),
        floor_scale=float(common.get(tc, "floor_scale", default=8192)),
        **base,
    )


def _layer(cfg: ModelConfig, i: int, p: str):
    ff = p + "feed_forward."
    tensors = common.attention(cfg, i, p + "self_attn.") + common.norms(cfg, i, p)
    if not cfg.layers[i].moe:
        tensors += common.swiglu(cfg, i, "mlp", ff + "gate_proj.weight", ff + "up_proj.weight",
                                 ff + "down_proj.weight")
        return tensors, []
    tensors.append(common.tensor(cfg, i, "router", common.Src(ff + "router.weight")))
    shared = ff + "shared_expert."
    tensors += common.swiglu(cfg, i, "shared", shared + "gate_proj.weight", shared + "up_proj.weight",
                             shared + "down_proj.weight")
    experts = [[common.expert_tensor(cfg, i, j, "gate_up", common.Src(ff + "experts.gate_up_proj", j, transpose=True)),
                common.expert_tensor(cfg, i, j, "down", common.Src(ff + "experts.down_proj", j, transpose=True))]
               for j in range(cfg.num_experts)]
    return tensors, experts


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    """The text model's tensors: at the top level, or under one of the multimodal layouts' prefixes."""
    for body, head, skip in _MULTIMODAL:
        if body + "embed_tokens.weight" in names:
            skipped = {n for n in names if n.startswith(skip)}
            return common.build_plan(cfg, names, _layer, body=body, head=head, skipped=skipped)
    return common.build_plan(cfg, names, _layer)
