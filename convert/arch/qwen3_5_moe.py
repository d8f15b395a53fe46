"""Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`, and the text model of the Hub's `Qwen3_5MoeForConditionalGeneration`).

Hybrid layers: `layer_types` (else every `full_attention_interval`-th layer, 4 by default, is full attention) makes
three of four layers Gated DeltaNet linear attention (attention "linear", moe.runtime.kernels.deltanet), the rest
gated full attention. Every layer is MoE.
- Full attention: Qwen3-MoE's GQA with q/k RMSNorm per head, but `q_proj` [2 nh hd, H] gives each head hd query
  rows then hd gate rows, and the attention output is scaled by sigmoid(gate) before `o_proj`; RoPE on each head's
  first hd * `partial_rotary_factor` dims (0.25), in halves. (The Hub's `mrope_section` splits the rotated dims
  among text, height and width positions: for text all three are the token's position, so it is plain RoPE.)
- Linear attention (`linear_attn.*`): `in_proj_qkv` [2 lk + lv, H] (lk = `linear_num_key_heads` x
  `linear_key_head_dim`, lv = `linear_num_value_heads` x `linear_value_head_dim`), `in_proj_z` [lv, H],
  `in_proj_b` and `in_proj_a` [nv, H]; `conv1d.weight` [2 lk + lv, 1, K] (K `linear_conv_kernel_dim`), a causal
  depthwise convolution then SiLU over q, k, v; q and k L2-normalized per head (eps 1e-6), q scaled by dk^-0.5;
  g = -exp(`A_log`) * softplus(a + `dt_bias`), beta = sigmoid(b); value head h reads key head h // (nv / nk); the
  gated delta rule; then an RMSNorm per value head (`norm.weight` [dv], weight as is) times silu(z); `out_proj`.
- Every other RMSNorm (input, post-attention, final, q/k) scales by 1 + weight (stored around 0): norm_offset 1.
- MoE: `mlp.gate.weight` [E, H], softmax over E, top-k, always renormalized; experts `mlp.experts.{j}.gate_proj/
  up_proj/down_proj` or fused `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first) and `down_proj` [E, H, F];
  a shared expert `mlp.shared_expert.*` of `shared_expert_intermediate_size`, scaled by
  sigmoid(`mlp.shared_expert_gate` x) as Qwen2-MoE's.
Multimodal repos keep the text config under `text_config` and the weights under `model.language_model.`, beside
`model.visual.*` and the multi-token prediction layer `mtp.*`, both skipped."""

from __future__ import annotations

from ...runtime.config import LayerSpec, ModelConfig
from ...runtime.errors import MoeError
from . import common, llama4

NAME = "qwen3_5_moe"
HF_ARCHITECTURES = ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")
MODEL_TYPES = ("qwen3_5_moe_text", "qwen3_5_moe")
_MULTIMODAL_BODY = "model.language_model."
_SKIPPED = ("model.visual.", "mtp.")


def model_config(hf: dict) -> ModelConfig:
    tc = llama4.text_config(hf)
    base = common.base_config(tc, eps=1e-6, max_positions=32768, head_dim=256,
                              attention_bias=bool(tc.get("attention_bias", False)))
    return ModelConfig(
        architecture=NAME,
        num_experts=int(common.get(tc, "num_experts", "num_local_experts", default=256)),
        top_k=int(common.get(tc, "num_experts_per_tok", default=8)),
        expert_intermediate_size=int(common.get(tc, "moe_intermediate_size", default=512)),
        shared_expert_intermediate_size=int(common.get(tc, "shared_expert_intermediate_size", default=512)),
        shared_expert_gate=True,
        layers=[LayerSpec(attention=kind, qk_norm="none" if kind == "linear" else "head")
                for kind in attention_kinds(tc, base["num_layers"])],
        router="softmax_topk",
        norm_topk_prob=True,
        **hybrid_attention(tc),
        **base,
    )


def attention_kinds(tc: dict, L: int) -> list[str]:
    """Each layer's attention, "linear" or "full", from `layer_types` or `full_attention_interval`."""
    interval = int(common.get(tc, "full_attention_interval", default=4))
    types = tc.get("layer_types") or ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                      for i in range(L)]
    if len(types) != L or not set(types) <= {"full_attention", "linear_attention"}:
        raise MoeError(f"config.json: layer_types needs {L} entries, each full_attention or linear_attention")
    return ["linear" if t == "linear_attention" else "full" for t in types]


def hybrid_attention(tc: dict) -> dict:
    """The ModelConfig fields of the gated full attention and the Gated DeltaNet (Qwen3-Next's too)."""
    rope = common.rope(tc, default_theta=10000.0)
    rope.partial_rotary_factor = float(common.get(tc.get("rope_parameters") or {}, "partial_rotary_factor",
                                                  default=common.get(tc, "partial_rotary_factor", default=0.25)))
    return dict(
        rope=rope,
        attn_output_gate=True,
        linear_num_key_heads=int(common.get(tc, "linear_num_key_heads", default=16)),
        linear_num_value_heads=int(common.get(tc, "linear_num_value_heads", default=32)),
        linear_key_head_dim=int(common.get(tc, "linear_key_head_dim", default=128)),
        linear_value_head_dim=int(common.get(tc, "linear_value_head_dim", default=128)),
        linear_conv_kernel=int(common.get(tc, "linear_conv_kernel_dim", default=4)),
        norm_offset=1.0,
    )


def linear_attention(cfg: ModelConfig, i: int, a: str, projections: tuple[common.Src, ...]) -> list[common.Out]:
    """Layer i's Gated DeltaNet tensors: linear.in from `projections` (the convolved q, k, v rows, then z, b, a),
    the rest from `{a}conv1d.weight` etc."""
    def t(short: str, src: str, **options) -> common.Out:
        return common.tensor(cfg, i, short, common.Src(a + src, **options))

    return [common.tensor(cfg, i, "linear.in", *projections), t("linear.conv", "conv1d.weight", flatten=True),
            t("linear.a_log", "A_log"), t("linear.dt_bias", "dt_bias"), t("linear.norm", "norm.weight"),
            t("attn.o", "out_proj.weight")]


def experts(cfg: ModelConfig, i: int, mlp: str, names: set[str]) -> list[list[common.Out]]:
    """Layer i's experts, one tensor each (as transformers saves them) or fused [E, ...] (gate rows first)."""
    fused = mlp + "experts."
    if fused + "gate_up_proj" not in names:
        return common.separate_experts(cfg, i, fused, "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    return [[common.expert_tensor(cfg, i, j, "gate_up", common.Src(fused + "gate_up_proj", j)),
             common.expert_tensor(cfg, i, j, "down", common.Src(fused + "down_proj", j))]
            for j in range(cfg.num_experts)]


def layer(cfg: ModelConfig, i: int, p: str, names: set[str], projections) -> tuple[list, list]:
    """Linear attention (linear.in from `projections(cfg, i, prefix)`) or gated full attention; norms; a dense
    MLP, or the router, the shared expert and its gate, and the experts."""
    if cfg.layers[i].attention == "linear":
        a = p + "linear_attn."
        tensors = linear_attention(cfg, i, a, projections(cfg, i, a))
    else:
        tensors = common.attention(cfg, i, p + "self_attn.")
    tensors += common.norms(cfg, i, p)
    mlp, shared = p + "mlp.", p + "mlp.shared_expert."
    if not cfg.layers[i].moe:
        return tensors + common.swiglu(cfg, i, "mlp", mlp + "gate_proj.weight", mlp + "up_proj.weight",
                                       mlp + "down_proj.weight"), []
    tensors.append(common.tensor(cfg, i, "router", common.Src(mlp + "gate.weight")))
    tensors += common.swiglu(cfg, i, "shared", shared + "gate_proj.weight", shared + "up_proj.weight",
                             shared + "down_proj.weight")
    tensors.append(common.tensor(cfg, i, "shared.gate", common.Src(mlp + "shared_expert_gate.weight")))
    return tensors, experts(cfg, i, mlp, names)


def _projections(cfg: ModelConfig, i: int, a: str) -> tuple[common.Src, ...]:
    return tuple(common.Src(f"{a}in_proj_{x}.weight") for x in ("qkv", "z", "b", "a"))


def plan(cfg: ModelConfig, names: set[str]) -> common.Plan:
    """The text model's tensors: at the top level, or under the multimodal layout's prefix."""
    def each(cfg: ModelConfig, i: int, p: str):
        return layer(cfg, i, p, names, _projections)

    if _MULTIMODAL_BODY + "embed_tokens.weight" in names:
        skipped = {n for n in names if n.startswith(_SKIPPED)}
        return common.build_plan(cfg, names, each, body=_MULTIMODAL_BODY, skipped=skipped)
    return common.build_plan(cfg, names, each, skipped={n for n in names if n.startswith("mtp.")})
