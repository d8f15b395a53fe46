"""The normalized model config stored in the manifest: everything the runtime knows of an architecture.

The converter's architecture files (moe.convert.arch) turn a Hugging Face config
into this; the runtime reads only this. Shape letters: H hidden, E experts,
F expert intermediate, nh/nkv query/key-value heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import MoeError


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


@dataclass
class LayerSpec:
    moe: bool = True  # MoE block, else a dense SwiGLU MLP (`mlp.*`)
    rope: bool = True  # False: NoPE layer (Llama 4)
    attention: str = "full"  # full | sliding | chunked
    window: int = 0  # sliding window or attention chunk size, in tokens
    qk_norm: str = "none"  # none | head (per head, weight [hd]) | full (weight [nh*hd]) | l2 (no weight)
    attn_temperature: bool = False  # Llama 4 NoPE layers: q scaled by 1 + attn_scale * log1p(floor((pos+1)/floor_scale))


@dataclass
class ModelConfig:
    architecture: str  # mixtral | qwen3_moe | olmoe | llama4 | gpt_oss
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
    # sigmoid_topk (Llama 4: sigmoid of the top-k logits scales the expert *input*)
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    router_bias: bool = False
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    dense_intermediate_size: int = 0  # dense (non-MoE) layers' MLP width
    activation: str = "silu"  # silu (SwiGLU) | gpt_oss (clamped: (u+1)*g*sigmoid(alpha*g))
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    expert_bias: bool = False
    attention_bias: bool = False  # qkv_bias and o_bias present
    attention_sinks: bool = False
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
        except (KeyError, TypeError) as exc:
            raise MoeError(f"manifest config is malformed ({exc}); reconvert the model") from None
        cfg.check()
        return cfg

    def check(self) -> None:
        """Reject configs no model can have: zero experts, top-k above E, heads that do not divide."""
        problems = []
        for name in ("hidden_size", "num_layers", "vocab_size", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name} must be a positive integer, not {v!r}")
        if problems:
            raise MoeError(f"config: {problems[0]}")
        if self.num_experts <= 0:
            problems.append(f"num_experts is {self.num_experts}; a MoE model needs at least one expert")
        elif not 0 < self.top_k <= self.num_experts:
            problems.append(f"experts per token ({self.top_k}) must be between 1 and the number of experts ({self.num_experts})")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads ({self.num_heads}) is not a multiple of num_key_value_heads ({self.num_kv_heads})")
        if len(self.layers) != self.num_layers:
            problems.append(f"{len(self.layers)} layer specs for {self.num_layers} layers")
        if any(layer.moe for layer in self.layers) and self.expert_intermediate_size <= 0:
            problems.append("expert intermediate size must be positive")
        if not self.rms_norm_eps > 0:
            problems.append(f"rms_norm_eps must be positive, not {self.rms_norm_eps!r}")
        if problems:
            raise MoeError(f"config: {problems[0]}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.moe]
