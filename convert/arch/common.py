"""What the architecture files share: config normalization and the recipe a layout tensor is built from.

A layout tensor (`Out`) is its source pieces (`Src`) concatenated along rows. A piece is a
Hub tensor, optionally one expert's slice of a fused [E, ...] tensor, transposed from
[in, out] to [out, in], and/or every `step`-th row from `start` (gpt-oss interleaves gate
and up), or with `block` the `block` rows there (Qwen3-Next groups q, k, v and z by key head).
`mxfp4` pieces are decoded from `<name>_blocks` and `<name>_scales`; `fp8_block` pieces (moe.convert.checks marks
those beside a `<name>_scale_inv`) from FP8 codes times a scale per block of that [rows, cols]; `flatten` pieces
(a depthwise convolution's [C, 1, K]) become [C, K].
Layout names and shapes come from moe.runtime.tensors; a recipe says only where each comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...runtime import tensors
from ...runtime.config import ModelConfig, Rope
from ...runtime.errors import MoeError
from ..fp8 import SCALE_SUFFIX


@dataclass(frozen=True)
class Src:
    name: str
    expert: int | None = None
    transpose: bool = False
    start: int = 0
    step: int = 1
    mxfp4: bool = False
    block: int = 1
    flatten: bool = False
    fp8_block: tuple[int, int] | None = None

    def sources(self) -> tuple[str, ...]:
        if self.mxfp4:
            return self.name + "_blocks", self.name + "_scales"
        if self.fp8_block:
            return self.name, self.name + SCALE_SUFFIX
        return (self.name,)


@dataclass(frozen=True)
class Out:
    name: str  # layout name
    shape: tuple[int, ...]  # what config.json says it must be
    srcs: tuple[Src, ...]


@dataclass(frozen=True)
class Run:
    """One expert's tensors, written as one contiguous run of experts.bin."""

    layer: int
    expert: int
    outs: tuple[Out, ...]


def outs_of(item: Out | Run) -> tuple[Out, ...]:
    return item.outs if isinstance(item, Run) else (item,)


@dataclass
class Plan:
    """Everything conversion writes, in source order (layer by layer), and what it deliberately leaves out."""

    config: ModelConfig
    items: list[Out | Run]
    skipped: set[str] = field(default_factory=set)

    def outs(self) -> list[Out]:
        return [o for item in self.items for o in outs_of(item)]

    def used(self) -> set[str]:
        return {n for o in self.outs() for s in o.srcs for n in s.sources()}


MAX_LAYERS = 4096  # the deepest Hub models have ~130


def get(hf: dict, *keys, default=None):
    """The first of `keys` present (and not null) in the config."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def need(hf: dict, *keys):
    v = get(hf, *keys)
    if v is None:
        raise MoeError(f"config.json: `{keys[0]}` is missing; the checkpoint's config is incomplete")
    return v


def rope(hf: dict, default_theta: float, interleaved: bool = False, defaults: dict | None = None) -> Rope:
    """Both config styles: `rope_parameters` (transformers 5), or top-level `rope_theta` + `rope_scaling`."""
    params = dict(defaults or {})
    params.update(get(hf, "rope_parameters", "rope_scaling", default={}))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "llama3", "yarn"):
        raise MoeError(f"config.json: rope type {kind!r} is not supported (moe knows default, llama3, yarn)")
    r = Rope(kind=kind, theta=float(get(params, "rope_theta", default=get(hf, "rope_theta", default=default_theta))),
             interleaved=interleaved)
    if kind == "default":
        return r
    r.factor = float(need(params, "factor"))
    r.original_max_position_embeddings = int(get(params, "original_max_position_embeddings",
                                                 default=hf.get("max_position_embeddings")))
    if kind == "llama3":
        r.low_freq_factor = float(need(params, "low_freq_factor"))
        r.high_freq_factor = float(need(params, "high_freq_factor"))
    else:
        r.beta_fast = float(params.get("beta_fast") or 32.0)
        r.beta_slow = float(params.get("beta_slow") or 1.0)
        r.attention_factor = params.get("attention_factor")
        r.truncate = bool(params.get("truncate", True))
        r.mscale = params.get("mscale")
        r.mscale_all_dim = params.get("mscale_all_dim")
    return r


def eos_ids(*values) -> list[int]:
    """Merge eos_token_id values (int or list) from config.json and generation_config.json, in order."""
    out = []
    for v in values:
        for i in v if isinstance(v, list) else [v]:
            if isinstance(i, int) and i not in out:
                out.append(i)
    return out


def base_config(hf: dict, *, eps: float = 1e-5, max_positions: int = 4096, head_dim: int | None = None,
                **kw) -> dict:
    """The ModelConfig fields every architecture reads the same way; the keyword defaults are transformers'
    for keys a config.json leaves out (head_dim None: hidden_size / num_attention_heads)."""
    hidden = int(need(hf, "hidden_size"))
    heads = int(need(hf, "num_attention_heads"))
    layers = int(need(hf, "num_hidden_layers"))
    if not 0 < layers <= MAX_LAYERS:  # before any per-layer list is built
        raise MoeError(f"config.json: num_hidden_layers {layers} is out of range (1 to {MAX_LAYERS})")
    return dict(
        hidden_size=hidden,
        num_layers=layers,
        vocab_size=int(need(hf, "vocab_size")),
        num_heads=heads,
        num_kv_heads=int(get(hf, "num_key_value_heads", default=heads)),
        head_dim=int(get(hf, "head_dim", default=head_dim or hidden // heads)),
        rms_norm_eps=float(get(hf, "rms_norm_eps", default=eps)),
        max_position_embeddings=int(get(hf, "max_position_embeddings", default=max_positions)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        **kw,
    )


def tensor(cfg: ModelConfig, i: int, short: str, *srcs: Src) -> Out:
    """Layer i's tensor `short` (a row of moe.runtime.tensors.LAYER, which gives its shape), made of `srcs`."""
    return Out(tensors.layer_name(i, short), tensors.LAYER[short].shape(cfg, cfg.layers[i]), srcs)


def expert_tensor(cfg: ModelConfig, i: int, j: int, short: str, *srcs: Src) -> Out:
    """Expert j of layer i's tensor `short` (a row of moe.runtime.tensors.EXPERT), made of `srcs`."""
    return Out(tensors.expert_name(i, j, short), tensors.EXPERT[short].shape(cfg, cfg.layers[i]), srcs)


def attention(cfg: ModelConfig, i: int, p: str) -> list[Out]:
    """q, k, v fused into one [q rows, k rows, v rows] matrix; o; and the biases, q/k norms and sinks the
    config gives this layer (moe.runtime.tensors says which)."""
    spec = cfg.layers[i]
    out = [tensor(cfg, i, "attn.qkv", *(Src(f"{p}{x}_proj.weight") for x in "qkv")),
           tensor(cfg, i, "attn.o", Src(f"{p}o_proj.weight"))]
    if tensors.LAYER["attn.qkv_bias"].present(cfg, spec):
        out.append(tensor(cfg, i, "attn.qkv_bias", *(Src(f"{p}{x}_proj.bias") for x in "qkv")))
    if tensors.LAYER["attn.o_bias"].present(cfg, spec):
        out.append(tensor(cfg, i, "attn.o_bias", Src(f"{p}o_proj.bias")))
    if tensors.LAYER["attn.q_norm"].present(cfg, spec):
        out += [tensor(cfg, i, "attn.q_norm", Src(f"{p}q_norm.weight")),
                tensor(cfg, i, "attn.k_norm", Src(f"{p}k_norm.weight"))]
    if tensors.LAYER["attn.sinks"].present(cfg, spec):
        out.append(tensor(cfg, i, "attn.sinks", Src(f"{p}sinks")))
    return out


def norms(cfg: ModelConfig, i: int, p: str) -> list[Out]:
    return [tensor(cfg, i, "attn_norm", Src(f"{p}input_layernorm.weight")),
            tensor(cfg, i, "ffn_norm", Src(f"{p}post_attention_layernorm.weight"))]


def swiglu(cfg: ModelConfig, i: int, mlp: str, gate: str, up: str, down: str) -> list[Out]:
    """Layer i's SwiGLU MLP `mlp` (`shared` or `mlp`) from separate [F, H] gate/up and [H, F] down matrices."""
    return [tensor(cfg, i, f"{mlp}.gate_up", Src(gate), Src(up)), tensor(cfg, i, f"{mlp}.down", Src(down))]


def separate_experts(cfg: ModelConfig, i: int, p: str, gate: str, up: str, down: str) -> list[list[Out]]:
    """Experts stored one tensor each: `{p}{j}.{gate}` etc."""
    return [[expert_tensor(cfg, i, j, "gate_up", Src(f"{p}{j}.{gate}"), Src(f"{p}{j}.{up}")),
             expert_tensor(cfg, i, j, "down", Src(f"{p}{j}.{down}"))]
            for j in range(cfg.num_experts)]


def globals_(cfg: ModelConfig, body: str, head: str, names: set[str]) -> tuple[list[Out], list[Out], set[str]]:
    """(tensors before the layers, after them, deliberately skipped): embed; norm and lm_head (absent when tied)."""
    def model_tensor(short: str, src: str) -> Out:
        return Out(short, tensors.GLOBAL[short].shape(cfg, None), (Src(src),))

    first = [model_tensor("embed", f"{body}embed_tokens.weight")]
    last = [model_tensor("norm", f"{body}norm.weight")]
    skipped = set()
    if tensors.GLOBAL["lm_head"].present(cfg, None):
        last.append(model_tensor("lm_head", head))
    elif head in names:
        skipped.add(head)  # a tied head stored anyway is the embedding again
    return first, last, skipped


def stray_buffers(names: set[str]) -> set[str]:
    """Non-weights some exporters leave in checkpoints: RoPE inverse-frequency buffers."""
    return {n for n in names if n.endswith("rotary_emb.inv_freq")}


def build_plan(cfg: ModelConfig, names: set[str], layer, body: str = "model.", head: str = "lm_head.weight",
               skipped: set[str] = frozenset()) -> Plan:
    """A Plan from an architecture's `layer(cfg, i, prefix) -> (tensors, experts: [[Out] per expert])`."""
    first, last, skip = globals_(cfg, body, head, names)
    items: list[Out | Run] = list(first)
    for i in range(cfg.num_layers):
        layer_tensors, layer_experts = layer(cfg, i, f"{body}layers.{i}.")
        items += layer_tensors
        items += [Run(i, j, tuple(outs)) for j, outs in enumerate(layer_experts)]
    return Plan(cfg, items + last, set(skipped) | skip | stray_buffers(names))
