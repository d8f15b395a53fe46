"""The layout's tensor names: one table of every tensor a converted model can hold, with its kind, its part
and its shape. The architecture recipes (moe.convert.arch) name their outputs from it, the config derives
the tensors it implies from it, the loader reads a layer by it, `moe info` sizes a model by it and the
encoding policy chooses by its kinds; a new tensor is one row here.

A name is global (`embed`), per layer (`layers.{i}.attn.qkv`) or per expert
(`layers.{i}.experts.{j}.gate_up`); the runtime never sees a Hugging Face name. Shape letters: H hidden,
V vocabulary, E experts, F an MLP's intermediate width, nh query heads, hd head dim, q = nh * hd and
kv = nkv * hd the query and key-value widths; under linear attention (Gated DeltaNet) nv value heads, lk and lv
the key and value widths, C = 2 lk + lv the convolved channels, K the convolution's taps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .config import LayerSpec, ModelConfig
from .errors import MoeError

# Kinds: what the encoding policy chooses by and the manifest's `quantization` is stated in.
EMBEDDINGS, LM_HEAD, NORMS, BIASES = "embeddings", "lm_head", "norms", "biases"
ATTENTION, ATTENTION_OUTPUT, ROUTER = "attention", "attention_output", "router"
EXPERTS, SHARED_EXPERT, DENSE_MLP = "experts", "shared_expert", "dense_mlp"
# Parts: the coarse split `moe info` sizes a model by.
PARTS = ("embeddings", "attention", "routers", "experts", "other")

Shape = Callable[[ModelConfig, LayerSpec], tuple[int, ...]]
Presence = Callable[[ModelConfig, LayerSpec], bool]


def _always(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return True


@dataclass(frozen=True)
class Tensor:
    short: str  # the name within its scope: `attn.qkv` is `layers.{i}.attn.qkv`
    kind: str
    part: str
    shape: Shape
    present: Presence = _always  # whether a model of this config (and this layer's spec) has it

    @property
    def field(self) -> str:
        """The loader's attribute for a layer tensor: `attn.qkv` -> `qkv`, `shared.gate_up` -> `shared_gate_up`."""
        return self.short.removeprefix("attn.").replace(".", "_")


def _qk_norm_width(full: Callable[[ModelConfig], int]) -> Shape:
    return lambda c, s: (full(c) if s.qk_norm == "full" else c.head_dim,)


def _moe(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return spec.moe


def _gqa(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return cfg.attention_kind == "gqa" and not _linear(cfg, spec)


def _linear(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return spec.attention == "linear"


def _q_rows(cfg: ModelConfig) -> int:
    """q's rows in attn.qkv: with an output gate, each head's hd query rows then its hd gate rows."""
    return 2 * cfg.q_dim if cfg.attn_output_gate else cfg.q_dim


def _mla(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return cfg.attention_kind == "mla"


def _q_lora(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return _mla(cfg, spec) and cfg.q_lora_rank > 0


def _shared(cfg: ModelConfig, spec: LayerSpec) -> bool:
    return spec.moe and cfg.shared_expert_intermediate_size > 0


GLOBAL = {t.short: t for t in (
    Tensor("embed", EMBEDDINGS, "embeddings", lambda c, s: (c.vocab_size, c.hidden_size)),
    Tensor("norm", NORMS, "other", lambda c, s: (c.hidden_size,)),
    Tensor("lm_head", LM_HEAD, "embeddings", lambda c, s: (c.vocab_size, c.hidden_size),
           lambda c, s: not c.tie_word_embeddings),
)}

LAYER = {t.short: t for t in (
    Tensor("attn_norm", NORMS, "other", lambda c, s: (c.hidden_size,)),
    Tensor("ffn_norm", NORMS, "other", lambda c, s: (c.hidden_size,)),
    # q rows, then k, then v
    Tensor("attn.qkv", ATTENTION, "attention", lambda c, s: (_q_rows(c) + 2 * c.kv_dim, c.hidden_size), _gqa),
    Tensor("attn.qkv_bias", BIASES, "attention", lambda c, s: (_q_rows(c) + 2 * c.kv_dim,),
           lambda c, s: c.attention_bias and _gqa(c, s)),
    # latent attention (attention_kind mla): q (or q_a, its norm, q_b) gives each head's nope then RoPE dims;
    # kv_a the latent's kv_lora_rank rows then the shared RoPE key's head_dim; kv_b each head's k_nope then v rows
    Tensor("attn.q", ATTENTION, "attention", lambda c, s: (c.num_heads * c.qk_head_dim, c.hidden_size),
           lambda c, s: _mla(c, s) and not c.q_lora_rank),
    Tensor("attn.q_a", ATTENTION, "attention", lambda c, s: (c.q_lora_rank, c.hidden_size), _q_lora),
    Tensor("attn.q_a_norm", NORMS, "attention", lambda c, s: (c.q_lora_rank,), _q_lora),
    Tensor("attn.q_b", ATTENTION, "attention", lambda c, s: (c.num_heads * c.qk_head_dim, c.q_lora_rank), _q_lora),
    Tensor("attn.kv_a", ATTENTION, "attention", lambda c, s: (c.kv_lora_rank + c.head_dim, c.hidden_size), _mla),
    Tensor("attn.kv_a_norm", NORMS, "attention", lambda c, s: (c.kv_lora_rank,), _mla),
    Tensor("attn.kv_b", ATTENTION, "attention",
           lambda c, s: (c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), _mla),
    # under linear attention, the output projection of its lv values
    Tensor("attn.o", ATTENTION_OUTPUT, "attention",
           lambda c, s: (c.hidden_size, c.linear_value_dim if _linear(c, s) else c.attn_out_dim)),
    Tensor("attn.o_bias", BIASES, "attention", lambda c, s: (c.hidden_size,),
           lambda c, s: c.attention_bias and c.attention_output_bias and not _linear(c, s)),
    # per head ([hd]) or over the whole projection ([q] and [kv])
    Tensor("attn.q_norm", NORMS, "attention", _qk_norm_width(lambda c: c.q_dim),
           lambda c, s: s.qk_norm in ("head", "full")),
    Tensor("attn.k_norm", NORMS, "attention", _qk_norm_width(lambda c: c.kv_dim),
           lambda c, s: s.qk_norm in ("head", "full")),
    Tensor("attn.sinks", BIASES, "attention", lambda c, s: (c.num_heads,), lambda c, s: c.attention_sinks),
    # linear attention: its input projection's C convolved rows (q, k, v), lv gate rows (z), nv write-rate rows (b)
    # and nv decay rows (a); the convolution's taps, exact as routers are; the decay's log scale and bias per value
    # head; the gated norm's weight
    Tensor("linear.in", ATTENTION, "attention",
           lambda c, s: (c.linear_conv_dim + c.linear_value_dim + 2 * c.linear_num_value_heads, c.hidden_size), _linear),
    Tensor("linear.conv", ROUTER, "attention", lambda c, s: (c.linear_conv_dim, c.linear_conv_kernel), _linear),
    Tensor("linear.a_log", BIASES, "attention", lambda c, s: (c.linear_num_value_heads,), _linear),
    Tensor("linear.dt_bias", BIASES, "attention", lambda c, s: (c.linear_num_value_heads,), _linear),
    Tensor("linear.norm", NORMS, "attention", lambda c, s: (c.linear_value_head_dim,), _linear),
    Tensor("router", ROUTER, "routers", lambda c, s: (c.num_experts, c.hidden_size), _moe),
    Tensor("router_bias", BIASES, "routers", lambda c, s: (c.num_experts,), lambda c, s: s.moe and c.router_bias),
    # added to the sigmoid scores only to choose the experts (sigmoid_group_topk), f32 as in the source
    Tensor("router_correction", BIASES, "routers", lambda c, s: (c.num_experts,),
           lambda c, s: s.moe and c.router == "sigmoid_group_topk"),
    # a SwiGLU MLP's gate_up holds F gate rows, then F up rows
    Tensor("shared.gate_up", SHARED_EXPERT, "other",
           lambda c, s: (2 * c.shared_expert_intermediate_size, c.hidden_size), _shared),
    Tensor("shared.down", SHARED_EXPERT, "other",
           lambda c, s: (c.hidden_size, c.shared_expert_intermediate_size), _shared),
    # one row: a token's shared-expert output is scaled by sigmoid(its dot product with x); exact, as routers are
    Tensor("shared.gate", ROUTER, "routers", lambda c, s: (1, c.hidden_size),
           lambda c, s: _shared(c, s) and c.shared_expert_gate),
    Tensor("mlp.gate_up", DENSE_MLP, "other", lambda c, s: (2 * c.dense_intermediate_size, c.hidden_size),
           lambda c, s: not s.moe),
    Tensor("mlp.down", DENSE_MLP, "other", lambda c, s: (c.hidden_size, c.dense_intermediate_size),
           lambda c, s: not s.moe),
)}

EXPERT = {t.short: t for t in (
    Tensor("gate_up", EXPERTS, "experts", lambda c, s: (2 * c.expert_intermediate_size, c.hidden_size)),
    Tensor("gate_up_bias", BIASES, "experts", lambda c, s: (2 * c.expert_intermediate_size,),
           lambda c, s: c.expert_bias),
    Tensor("down", EXPERTS, "experts", lambda c, s: (c.hidden_size, c.expert_intermediate_size)),
    Tensor("down_bias", BIASES, "experts", lambda c, s: (c.hidden_size,), lambda c, s: c.expert_bias),
)}


def layer_name(i: int, short: str) -> str:
    return f"layers.{i}.{short}"


def expert_name(i: int, j: int, short: str) -> str:
    return f"layers.{i}.experts.{j}.{short}"


def expert_key(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, short name) of an expert tensor's name, None for any other tensor."""
    parts = name.split(".", 4)
    if len(parts) == 5 and parts[0] == "layers" and parts[2] == "experts":
        return int(parts[1]), int(parts[3]), parts[4]
    return None


def lookup(name: str) -> Tensor:
    """The table's row for a layout tensor name; a name outside the table is a bug in whoever made it."""
    key = expert_key(name)
    if key is not None:
        row = EXPERT.get(key[2])
    elif name.startswith("layers."):
        row = LAYER.get(name.split(".", 2)[2] if name.count(".") >= 2 else "")
    else:
        row = GLOBAL.get(name)
    if row is None:
        raise MoeError(f"tensor {name} is not one moe knows; this is a bug in moe", 1)
    return row


def kind_of(name: str) -> str:
    return lookup(name).kind


def part_of(name: str) -> str:
    return lookup(name).part


def implied(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every layout tensor a model of this config holds, with its shape, in the table's order."""
    out = {t.short: t.shape(cfg, None) for t in GLOBAL.values() if t.present(cfg, None)}
    for i, spec in enumerate(cfg.layers):
        out.update({layer_name(i, t.short): t.shape(cfg, spec) for t in LAYER.values() if t.present(cfg, spec)})
        if spec.moe:
            rows = [t for t in EXPERT.values() if t.present(cfg, spec)]
            for j in range(cfg.num_experts):
                out.update({expert_name(i, j, t.short): t.shape(cfg, spec) for t in rows})
    return out
