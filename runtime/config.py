"""The normalized model config stored in the manifest: everything the runtime knows of an architecture.

The converter's architecture files (moe.convert.arch) turn a Hugging Face config
into this; the runtime reads only this. Shape letters: H hidden, E experts,
F expert intermediate, nh/nkv query/key-value heads, hd head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import MoeError

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "sigmoid_group_topk", "softmax_group_topk")
ACTIVATIONS = ("silu", "gpt_oss")
ATTENTIONS = ("full", "sliding", "chunked", "linear")
ATTENTION_KINDS = ("gqa", "mla")
QK_NORMS = ("none", "head", "full", "l2")
ROPE_KINDS = ("default", "llama3", "yarn")


@dataclass
class Rope:
    kind: str = "default"  # default | llama3 | yarn
    theta: float = 10000.0
    interleaved: bool = False  # Llama 4 rotates pairs (x0, x1); the others rotate halves
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # yarn's cos/sin multiplier; None: derived from factor
    truncate: bool = True
    mscale: float | None = None
    mscale_all_dim: float | None = None
    partial_rotary_factor: float = 1.0  # GLM-4.5 rotates only each head's first hd * this dims (0.5)

    def problem(self) -> str | None:
        """What makes the frequency formulas (moe.runtime.kernels.rope) divide by zero or take a bad log."""
        if self.kind not in ROPE_KINDS:
            return f"rope kind {self.kind!r} is not one of {', '.join(ROPE_KINDS)}"
        if not 0 < self.partial_rotary_factor <= 1:
            return f"partial_rotary_factor must be in (0, 1], not {self.partial_rotary_factor!r}"
        if not self.theta > 1:
            return f"rope theta must be above 1, not {self.theta!r}"
        if self.kind == "llama3" and not (self.factor > 0 and self.low_freq_factor > 0 and self.high_freq_factor > 0
                                          and self.high_freq_factor != self.low_freq_factor
                                          and self.original_max_position_embeddings > 0):
            return "llama3 rope needs positive factor, original_max_position_embeddings and distinct freq factors"
        if self.kind == "yarn" and not (self.factor >= 0 and self.beta_fast > 0 and self.beta_slow > 0
                                        and self.original_max_position_embeddings > 0):
            return "yarn rope needs positive beta_fast, beta_slow and original_max_position_embeddings"
        return None


@dataclass
class LayerSpec:
    moe: bool = True  # MoE block, else a dense SwiGLU MLP (`mlp.*`)
    rope: bool = True  # False: NoPE layer (Llama 4)
    attention: str = "full"  # full | sliding | chunked | linear (Gated DeltaNet: a recurrent state, no KV cache)
    window: int = 0  # sliding window or attention chunk size, in tokens
    qk_norm: str = "none"  # none | head (per head, weight [hd]) | full (weight [nh*hd]) | l2 (no weight)
    attn_temperature: bool = False  # Llama 4 NoPE layers: q scaled by 1 + attn_scale * log1p(floor((pos+1)/floor_scale))


@dataclass
class ModelConfig:
    architecture: str  # the converter's name for it (moe.convert.arch); the runtime goes by the fields below
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    max_position_embeddings: int
    layers: list[LayerSpec]
    rope: Rope = field(default_factory=Rope)
    tie_word_embeddings: bool = False
    # router: softmax_topk (softmax over E, then top-k; renormalize if norm_topk_prob),
    # topk_softmax (gpt-oss: top-k of logits + bias, softmax over the k),
    # sigmoid_topk (Llama 4: sigmoid of the top-k logits scales the expert *input*),
    # sigmoid_group_topk (GLM-4.5, DeepSeek-V3: sigmoid scores plus `router_correction` choose, within the
    # topk_group best of n_group expert groups, the top-k; their uncorrected scores, renormalized if norm_topk_prob,
    # times routed_scaling_factor, are the weights); softmax_topk's weights are scaled by it too (DeepSeek-V2),
    # softmax_group_topk (DeepSeek-V2's group_limited_greedy: softmax_topk within the topk_group of n_group groups
    # whose best probability is highest, not renormalized, times routed_scaling_factor)
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_bias: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(shared.gate x) (Qwen2-MoE)
    dense_intermediate_size: int = 0  # dense (non-MoE) layers' MLP width
    activation: str = "silu"  # silu (SwiGLU) | gpt_oss (clamped: (u+1)*g*sigmoid(alpha*g))
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    expert_bias: bool = False
    attention_bias: bool = False  # qkv_bias present, and o_bias unless attention_output_bias is False
    attention_output_bias: bool = True  # Qwen2-MoE biases q, k and v only
    attention_sinks: bool = False
    # attention_kind mla (DeepSeek-V2/V3's multi-head latent attention): q through a rank-q_lora_rank bottleneck
    # (0: one q matrix); k and v of every head expanded (kv_b) from one normalized latent of kv_lora_rank dims per
    # position, which is what the cache holds, beside a RoPE key part shared by the heads (head_dim wide); a
    # head's q and k are qk_nope_head_dim dims without RoPE, then head_dim with it; its v is v_head_dim
    attention_kind: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    latent_norm_eps: float = 1e-6  # q_a_norm's and kv_a_norm's: transformers' RMSNorm default, not rms_norm_eps
    attention_scale: float | None = None  # the softmax's; None: head_dim ** -0.5
    attn_output_gate: bool = False  # q rows give each head's query, then its gate: output * sigmoid(gate) (Qwen3.5)
    # linear attention layers (Qwen3.5's Gated DeltaNet, moe.runtime.kernels.deltanet): q and k in key heads, v in
    # value heads (a multiple of them), through a causal depthwise convolution of linear_conv_kernel taps
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    norm_offset: float = 0.0  # added to every RMSNorm weight but the gated one: Qwen3.5 scales by 1 + weight
    clip_qkv: float | None = None
    attn_scale: float = 0.1
    floor_scale: float = 8192.0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        try:
            known = {f.name for f in fields(cls)}
            kw = {k: v for k, v in d.items() if k in known}
            kw["layers"] = [LayerSpec(**layer) for layer in d["layers"]]
            kw["rope"] = Rope(**d.get("rope", {}))
            cfg = cls(**kw)
        except (KeyError, TypeError, AttributeError) as exc:
            raise MoeError(f"config: malformed ({exc})") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        """Reject configs no model can have: wrong types, zero experts, top-k above E, heads that do not divide,
        unknown router, attention or RoPE kinds, RoPE parameters its formulas divide by zero with."""
        problem = _type_problem(self, "") or self._range_problem()
        if problem:
            raise MoeError(f"config: {problem}")

    def _range_problem(self) -> str | None:
        for name in ("hidden_size", "num_layers", "vocab_size", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                return f"{name} must be a positive integer, not {getattr(self, name)!r}"
        if not self.architecture:
            return "architecture must be named"
        for name, allowed in (("router", ROUTERS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                return f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
        if self.num_experts <= 0:
            return f"num_experts is {self.num_experts}; a MoE model needs at least one expert"
        if not 0 < self.top_k <= self.num_experts:
            return f"experts per token ({self.top_k}) must be between 1 and the number of experts ({self.num_experts})"
        if self.num_heads % self.num_kv_heads:
            return f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})"
        if self.head_dim % 2:
            return f"head_dim ({self.head_dim}) must be even for rotary embeddings"
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            return f"the rotated part of a head ({self.rotary_dim} of {self.head_dim} dims) must be even and not empty"
        if len(self.layers) != self.num_layers:
            return f"{len(self.layers)} layer specs for {self.num_layers} layers"
        if any(layer.moe for layer in self.layers) and self.expert_intermediate_size <= 0:
            return "expert intermediate size must be positive"
        if not all(layer.moe for layer in self.layers) and self.dense_intermediate_size <= 0:
            return "dense layers need a positive intermediate size"
        if self.shared_expert_intermediate_size < 0:
            return "shared expert intermediate size must not be negative"
        if not self.rms_norm_eps > 0:
            return f"rms_norm_eps must be positive, not {self.rms_norm_eps!r}"
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            return f"clip_qkv must be positive, not {self.clip_qkv!r}"
        if self.attention_kind not in ATTENTION_KINDS:
            return f"attention_kind {self.attention_kind!r} is not one of {', '.join(ATTENTION_KINDS)}"
        if self.attention_kind == "mla" and not (self.kv_lora_rank > 0 and self.qk_nope_head_dim > 0
                                                 and self.v_head_dim > 0 and self.q_lora_rank >= 0):
            return "latent attention needs positive kv_lora_rank, qk_nope_head_dim and v_head_dim"
        if self.attention_scale is not None and not self.attention_scale > 0:
            return f"attention_scale must be positive, not {self.attention_scale!r}"
        for i, layer in enumerate(self.layers):
            if layer.attention not in ATTENTIONS or layer.qk_norm not in QK_NORMS:
                return f"layer {i}: attention {layer.attention!r} or qk_norm {layer.qk_norm!r} is unknown"
            if layer.window < 0 or (layer.attention in ("sliding", "chunked") and layer.window == 0):
                return f"layer {i}: {layer.attention} attention needs a positive window, not {layer.window}"
        return self._group_problem() or self._linear_problem() or self.rope.problem()

    def _linear_problem(self) -> str | None:
        if not self.linear_layers():
            return None
        nk, nv = self.linear_num_key_heads, self.linear_num_value_heads
        if min(nk, nv, self.linear_key_head_dim, self.linear_value_head_dim, self.linear_conv_kernel - 1) <= 0:
            return "linear attention needs positive head counts and dims and a convolution of at least 2 taps"
        if nv % nk:
            return f"linear attention's {nv} value heads are not a multiple of its {nk} key heads"
        return None

    def _group_problem(self) -> str | None:
        """Group-limited routing needs equal groups whose kept ones hold k experts, of at least 2 experts under
        sigmoid_group_topk (which rates a group by its best two)."""
        if self.router not in ("sigmoid_group_topk", "softmax_group_topk"):
            return None
        E, groups, kept = self.num_experts, self.n_group, self.topk_group
        least = 2 if self.router == "sigmoid_group_topk" else 1
        if groups <= 0 or E % groups or E // groups < least:
            return f"{E} experts do not split into n_group {groups} groups of at least {least}"
        if not 0 < kept <= groups or self.top_k > kept * (E // groups):
            return f"topk_group {kept} of {groups} groups must be positive and hold the {self.top_k} experts per token"
        return None

    @property
    def rotary_dim(self) -> int:
        """How many of each head's leading dims RoPE rotates."""
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    @property
    def qk_head_dim(self) -> int:
        """A head's query and key width: its RoPE part (head_dim) after the latent attention's unrotated part."""
        return self.qk_nope_head_dim + self.head_dim

    @property
    def attn_out_dim(self) -> int:
        """The attention output's width, o's input: nh * v_head_dim under latent attention, else q_dim."""
        return self.num_heads * (self.v_head_dim if self.attention_kind == "mla" else self.head_dim)

    @property
    def kv_cache_width(self) -> int:
        """f32 values cached per position and layer: the latent and the RoPE key, or every kv head's k and v."""
        return self.kv_lora_rank + self.head_dim if self.attention_kind == "mla" else 2 * self.kv_dim

    @property
    def kv_cache_rows(self) -> int:
        """Rows cached per position and layer (a q8 cache keeps a scale for each): one latent row, or a k and a v row
        per kv head."""
        return 1 if self.attention_kind == "mla" else 2 * self.num_kv_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def linear_conv_dim(self) -> int:
        """The convolved channels: q, k, then v."""
        return 2 * self.linear_key_dim + self.linear_value_dim

    @property
    def recurrent_state_width(self) -> int:
        """f32 values a linear attention layer keeps per sequence: its convolution's last inputs and its state."""
        return ((self.linear_conv_kernel - 1) * self.linear_conv_dim
                + self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim)

    @property
    def state_bytes_per_token(self) -> int:
        """Bytes of recurrent state a token touches: f32, two passes over each linear attention layer's (decay and
        read, then update and read out)."""
        return 2 * 4 * len(self.linear_layers()) * self.recurrent_state_width

    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.moe]

    def linear_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.attention == "linear"]


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "float | None": (int, float, type(None)),
          "int | None": (int, type(None))}


def _type_problem(obj, where: str) -> str | None:
    """The first field of a config dataclass whose value is not of its declared type (bools are not numbers,
    floats are finite), recursing into layers and rope; None if all are."""
    for f in fields(obj):
        v, name = getattr(obj, f.name), where + f.name
        if f.type == "list[LayerSpec]":
            if not isinstance(v, list) or not all(isinstance(x, LayerSpec) for x in v):
                return f"{name} must be a list of layer specs"
            problems = (_type_problem(x, f"layers[{i}].") for i, x in enumerate(v))
            problem = next((p for p in problems if p), None)
        elif f.type == "Rope":
            problem = _type_problem(v, "rope.") if isinstance(v, Rope) else f"{name} must be an object"
        elif f.type == "list[int]":
            ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            problem = None if ok else f"{name} must be a list of integers, not {v!r}"
        else:
            kind = _TYPES[f.type]
            ok = isinstance(v, kind) and (f.type == "bool" or not isinstance(v, bool))
            ok = ok and not (isinstance(v, float) and not math.isfinite(v))
            problem = None if ok else f"{name} must be {f.type.replace(' | None', ' or null')}, not {v!r}"
        if problem:
            return problem
    return None
