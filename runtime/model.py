"""A converted model, run on the CPU: router first, then only the chosen experts.

Shape letters: T tokens in this call, H hidden, E experts, k experts per token, F an MLP's
intermediate width, nh/nkv query/key-value heads, hd head dim, P context positions, V vocabulary.

`forward` runs T tokens at positions pos .. pos+T-1 through every layer, appending their keys
and values to the KV cache (a linear attention layer folds them into its recurrent state instead).
Prefill (T > 1) groups the tokens by expert, so each chosen expert's weights are read once per
layer; decode (T = 1) reuses buffers allocated at load.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels, tensors
from .budget import Memory, decide
from .codec import dequantize
from .config import LayerSpec, ModelConfig
from .errors import MoeError
from .experts import ExpertStore, MappedExperts
from .kernels import deltanet, rope
from .kernels.attention import attend, cache_rows, per_head, temperature
from .kernels.embed import embed
from .kernels.ffn import gather, scatter_add, swiglu, swiglu_clamped
from .kernels.norms import rmsnorm
from .kernels.qmatmul import Scratch, linear, linear_each
from .kernels.routing import (
    group_by_expert,
    sigmoid_group_topk,
    sigmoid_topk,
    softmax_group_topk,
    softmax_topk,
    topk_softmax,
)
from .layout import KV_CACHE_KINDS, MANIFEST, MODEL_FILE, Layout, Packed, open_layout
from .machine import peak_rss, use_threads
from .paging import PagedExperts

DEFAULT_MAX_CONTEXT = 4096
F32 = np.float32


@dataclass
class _Layer:
    """One decoder layer's non-expert tensors (moe.runtime.tensors.LAYER, by their `field` names): views into
    model.bin; 1-D tensors as their f32 values."""

    spec: LayerSpec
    attn_norm: np.ndarray  # (H,)
    ffn_norm: np.ndarray  # (H,)
    o: Packed  # [H, nh*hd], or [H, nh*v] under latent attention
    qkv: Packed | None = None  # [nh*hd + 2*nkv*hd, H]
    qkv_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # (hd,) per head or (nh*hd,) full width
    k_norm: np.ndarray | None = None
    sinks: np.ndarray | None = None  # (nh,)
    router: Packed | None = None  # [E, H] in the source's encoding (exact)
    router_bias: np.ndarray | None = None  # (E,)
    router_correction: np.ndarray | None = None  # (E,)
    shared_gate_up: Packed | None = None  # [2F, H]
    shared_down: Packed | None = None  # [H, F]
    shared_gate: Packed | None = None  # [1, H]
    mlp_gate_up: Packed | None = None  # dense layer
    mlp_down: Packed | None = None
    # latent attention: nq = nh * (nope + rope), r = kv_lora_rank, rq = q_lora_rank
    q: Packed | None = None  # [nq, H]
    q_a: Packed | None = None  # [rq, H]
    q_a_norm: np.ndarray | None = None  # (rq,)
    q_b: Packed | None = None  # [nq, rq]
    kv_a: Packed | None = None  # [r + rope, H]
    kv_a_norm: np.ndarray | None = None  # (r,)
    kv_b: Packed | None = None  # [nh * (nope + v), r]
    absorb_q: np.ndarray | None = None  # (nh, r, nope) f32: kv_b's k rows per head, transposed
    absorb_o: np.ndarray | None = None  # (nh, v, r) f32: kv_b's v rows per head
    # linear attention: C convolved channels, lv values, nv value heads of dv
    linear_in: Packed | None = None  # [C + lv + 2 nv, H]
    linear_conv: Packed | None = None  # [C, K]
    linear_a_log: np.ndarray | None = None  # (nv,)
    linear_dt_bias: np.ndarray | None = None  # (nv,)
    linear_norm: np.ndarray | None = None  # (dv,)
    conv_taps: np.ndarray | None = None  # (K, C) f32: linear_conv's values, tap-major for the convolution

    @classmethod
    def load(cls, layout: Layout, i: int, spec: LayerSpec) -> _Layer:
        def read(name: str) -> Packed | np.ndarray:
            p = layout.packed(name)
            return p.codes if len(p.shape) == 1 else p

        names = {t.field: tensors.layer_name(i, t.short) for t in tensors.LAYER.values()}
        return cls(spec, **{field: read(name) for field, name in names.items() if layout.has(name)})

    @property
    def shared(self) -> tuple[Packed, Packed] | None:
        return (self.shared_gate_up, self.shared_down) if self.shared_gate_up is not None else None

    @property
    def mlp(self) -> tuple[Packed, Packed] | None:
        return (self.mlp_gate_up, self.mlp_down) if self.mlp_gate_up is not None else None


class _Buffers:
    """Every activation of one forward call of T tokens, so the call itself allocates nothing."""

    def __init__(self, cfg: ModelConfig, T: int, widths: set[int]):
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qd, kvd, E, k = cfg.q_dim, cfg.kv_dim, cfg.num_experts, cfg.top_k
        self.T = T
        self.x = np.zeros((T, H), F32)  # the residual stream
        self.xn = np.zeros((T, H), F32)  # its normalized copy, input of attention and FFN
        self.y = np.zeros((T, H), F32)  # a block's output, added to x
        if cfg.attention_kind == "mla":
            self.latent = _LatentBuffers(cfg, T)
        else:
            qr = 2 * qd if cfg.attn_output_gate else qd  # q rows, with each head's gate rows after its query's
            self.qkv = np.zeros((T, qr + 2 * kvd), F32)
            q_gate = _view(self.qkv[:, :qr], (T, nh, qr // nh))
            self.q, self.gate = q_gate[:, :, :hd], q_gate[:, :, hd:]  # (T, nh, hd), (T, nh, hd or 0)
            self.k = _view(self.qkv[:, qr: qr + kvd], (T, nkv, hd))
            self.v = _view(self.qkv[:, qr + kvd:], (T, nkv, hd))
            self.q_flat = _view(self.qkv[:, :qd], (T, 1, qd))  # OLMoE's full-width q/k norms
            self.k_flat = _view(self.qkv[:, qd: qd + kvd], (T, 1, kvd))
            self.attn = np.zeros((T, nh, hd), F32)
        if cfg.linear_layers():
            self.linear = _LinearBuffers(cfg, T)
        self.router = np.zeros((T, E), F32)
        self.shared_gate = np.zeros((T, 1), F32)
        self.idx = np.zeros((T, k), np.int64)
        self.w = np.zeros((T, k), F32)
        self.offsets = np.zeros(E + 1, np.int64)
        self.order = np.zeros(T * k, np.int64)
        self.active = np.zeros(E, np.int64)
        n = max(T, k)  # rows of one expert's tokens (prefill) or of a token's k experts (decode)
        self.xe = np.zeros((n, H), F32)  # gathered inputs
        self.ye = np.zeros((n, H), F32)  # and outputs
        self.hidden = {F: (np.zeros((n, 2 * F), F32), np.zeros((n, F), F32)) for F in widths}  # (gate_up, act)
        self.logits = np.zeros((1, cfg.vocab_size), F32)  # last-token logits

    @property
    def x3(self) -> np.ndarray:
        return self.x.reshape(self.T, 1, -1)

    @property
    def xn3(self) -> np.ndarray:
        return self.xn.reshape(self.T, 1, -1)


class _LatentBuffers:
    """Latent attention's activations: r = kv_lora_rank, nope + rope a head's q width, v its value width."""

    def __init__(self, cfg: ModelConfig, T: int):
        nh, r, rd, v = cfg.num_heads, cfg.kv_lora_rank, cfg.head_dim, cfg.v_head_dim  # rd: the RoPE part
        self.q_lat = np.zeros((T, max(cfg.q_lora_rank, 1)), F32)  # q's bottleneck
        self.q = np.zeros((T, nh, cfg.qk_head_dim), F32)
        self.kv_a = np.zeros((T, r + rd), F32)  # the latent, then the RoPE key: one cache row
        self.q_abs = np.zeros((T, nh, r + rd), F32)  # q in the cache row's space
        self.attn_lat = np.zeros((T, nh, r + rd), F32)  # attention over cache rows; [..., :r] used
        self.attn = np.zeros((T, nh, v), F32)


class _LinearBuffers:
    """Gated DeltaNet's activations: C = 2 lk + lv convolved channels (q, k, v), nk/nv key/value heads of dk/dv."""

    def __init__(self, cfg: ModelConfig, T: int):
        C, lk, lv = cfg.linear_conv_dim, cfg.linear_key_dim, cfg.linear_value_dim
        nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                          cfg.linear_value_head_dim)
        self.proj = np.zeros((T, C + lv + 2 * nv), F32)  # linear.in's output: to convolve, z, b, a
        self.mixed = self.proj[:, :C]
        self.z = _view(self.proj[:, C: C + lv], (T, nv, dv))
        self.b = self.proj[:, C + lv: C + lv + nv]
        self.a = self.proj[:, C + lv + nv:]
        self.conv = np.zeros((T, C), F32)
        self.q = _view(self.conv[:, :lk], (T, nk, dk))
        self.k = _view(self.conv[:, lk: 2 * lk], (T, nk, dk))
        self.v = _view(self.conv[:, 2 * lk:], (T, nv, dv))
        self.g = np.zeros((T, nv), F32)  # log decay
        self.beta = np.zeros((T, nv), F32)
        self.out = np.zeros((T, nv, dv), F32)


def _lazy_zeros(shape: tuple[int, ...], dtype=F32) -> np.ndarray:
    """Zeros in anonymous memory that is committed page by page as it is written. Transparent huge
    pages are refused: each head's rows of the KV cache start 2 MiB apart, so one token would commit
    2 MiB per head and layer (1 GiB for OLMoE's cache after the first prompt)."""
    dtype = np.dtype(dtype)
    buf = mmap.mmap(-1, max(1, math.prod(shape) * dtype.itemsize))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype, math.prod(shape)).reshape(shape)


def _view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """a reshaped without a copy (assigning .shape raises rather than copy)."""
    v = a.view()
    v.shape = shape
    return v


class Model:
    """A converted model with its KV cache (and recurrent states). `forward` is the one entry; the rest wraps it."""

    def __init__(self, layout: Layout, experts: ExpertStore, memory: Memory, max_context: int,
                 kv_dtype: np.dtype | None = None):
        self.layout = layout
        self.config = cfg = layout.config
        self.experts = experts
        self.memory = memory  # how the experts are held, and what to tell the user about it
        self.max_context = max_context
        self.pos = 0  # tokens in the KV cache
        self._ids = np.zeros(max_context, np.int64)  # (P,) the token ids whose keys and values it holds, [:pos]
        self.routing_trace: list | None = None  # set to a list to record (layer, idx (T, k), weights (T, k)) per MoE layer
        self._tokens = 0
        self._tokenizer = None
        self.embed = layout.packed("embed")  # [V, H]
        self.lm_head = layout.packed("lm_head") if layout.has("lm_head") else self.embed
        self.norm = layout.packed("norm").codes
        self.layers = [_Layer.load(layout, i, spec) for i, spec in enumerate(cfg.layers)]
        if cfg.norm_offset:
            self._offset_norms(cfg.norm_offset)
        freq, attention_factor = rope.inv_freq(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings)
        self._cos, self._sin = rope.tables(freq, attention_factor, max_context)  # (P, rotary_dim/2)
        self.kv_dtype = kv_dtype = layout.kv_cache_dtype() if kv_dtype is None else kv_dtype
        mla = cfg.attention_kind == "mla"  # one row per position, the keys; its latent part is also the values
        heads, width = (1, cfg.kv_cache_width) if mla else (cfg.num_kv_heads, cfg.head_dim)
        rows = (cfg.num_layers, heads, max_context)
        scales = rows if kv_dtype == np.int8 else (cfg.num_layers, heads, 0)  # q8: each row's scale; else none
        self._k = _lazy_zeros((*rows, width), kv_dtype)  # pages are committed only as positions fill
        self._v = self._k if mla else _lazy_zeros((*rows, width), kv_dtype)
        self._ks = _lazy_zeros(scales)
        self._vs = self._ks if mla else _lazy_zeros(scales)
        linear_layers = cfg.linear_layers()
        self._state_of = {i: n for n, i in enumerate(linear_layers)}  # layer -> its recurrent state's index
        self._conv_state = np.zeros((len(linear_layers), max(cfg.linear_conv_kernel - 1, 0), cfg.linear_conv_dim), F32)
        self._recurrent = np.zeros((len(linear_layers), cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                    cfg.linear_value_head_dim), F32)
        for i in linear_layers:
            self.layers[i].conv_taps = np.ascontiguousarray(dequantize(self.layers[i].linear_conv).T)
        self._ones = np.ones(cfg.head_dim, F32)  # Llama 4's L2 norm is an RMSNorm without weight
        self._no_sinks = np.zeros(cfg.num_heads, F32)
        self._uses = np.zeros((cfg.num_layers, cfg.num_experts), np.int64)
        self._widths = {cfg.expert_intermediate_size} | {
            mlp[0].shape[0] // 2 for layer in self.layers for mlp in (layer.shared, layer.mlp) if mlp
        }
        self._scratch = Scratch()  # grows to the largest call once, then is reused
        for layer in self.layers:
            if layer.kv_b is not None:
                self._absorb(layer)
        self._decode = _Buffers(cfg, 1, self._widths)
        moe_layers = cfg.moe_layers()
        self._next_moe = [next((j for j in moe_layers if j > i), -1) for i in range(cfg.num_layers)]
        self._guess_xn = np.zeros((1, cfg.hidden_size), F32)  # next MoE layer's router input and logits
        self._guess = np.zeros((1, cfg.num_experts), F32)
        self._prefill: _Buffers | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def kv_cache(self) -> str:
        """How the KV cache holds keys and values: f32, bf16 or q8 (layout.KV_CACHE_KINDS)."""
        return next(kind for kind, dtype in KV_CACHE_KINDS.items() if dtype == self.kv_dtype)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_folder(self.layout.folder, self.layout.manifest)
        return self._tokenizer

    @property
    def stats(self) -> dict:
        """Tokens run, expert cache figures, and per MoE layer how many tokens each expert received."""
        s = self.experts
        hits, misses = int(s.hits.sum()), int(s.misses.sum())
        return {
            "tokens": self._tokens,
            "memory_budget_bytes": self.memory.budget,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else 1.0,
            "prefetch_hits": int(s.prefetch_hits.sum()),
            "prefetch_accuracy": int(s.predicted_right.sum()) / int(s.predicted.sum()) if s.predicted.sum() else None,
            "bytes_read": int(s.bytes_read.sum()),
            "bytes_read_per_token": int(s.bytes_read.sum()) / self._tokens if self._tokens else 0.0,
            "peak_rss_bytes": peak_rss(),
            "layers": [
                {"layer": i, "expert_uses": self._uses[i].tolist(), "hits": int(s.hits[i]),
                 "misses": int(s.misses[i]), "prefetch_hits": int(s.prefetch_hits[i]),
                 "bytes_read": int(s.bytes_read[i])}
                for i in self.config.moe_layers()
            ],
        }

    def reset(self, pos: int = 0) -> None:
        """Empty the KV cache, or keep its first `pos` positions (the rest is overwritten as tokens run).

        A recurrent state (linear attention) cannot rewind: it keeps every position (pos = self.pos) or none."""
        if self._recurrent.size and pos not in (0, self.pos):
            raise MoeError(f"linear attention cannot rewind from {self.pos} tokens to {pos}; this is a bug in moe", 1)
        if pos == 0:
            self._conv_state[:] = 0.0
            self._recurrent[:] = 0.0
        self.pos = pos

    def cached_prefix(self, ids) -> int:
        """How many leading ids the KV cache already holds, leaving at least the last one to run for its logits;
        with linear attention, all the cached ids or none.

        `reset(cached_prefix(ids))` then `forward(ids[n:])` gives the logits of a fresh `forward(ids)`, bit for
        bit: every kernel computes a token's row the same whatever else is in the call (tests/test_serve.py).
        Not so under linear attention: prefill folds a prompt into its state chunk by chunk, decode token by token.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = max(0, min(self.pos, ids.size - 1))
        differ = np.flatnonzero(self._ids[:n] != ids[:n])
        same = int(differ[0]) if differ.size else n
        return 0 if self._recurrent.size and same != self.pos else same

    def logits(self, ids) -> np.ndarray:
        """f32 [T, V]: the logits of every position of ids, from an empty cache."""
        self.reset()
        return self.forward(ids)

    def forward(self, ids, last_only: bool = False) -> np.ndarray:
        """Run ids (T,) at positions pos .. pos+T-1; f32 [T, V] logits, or [1, V] for the last token.

        With last_only the result lives in a buffer the next call overwrites (decode allocates nothing).
        """
        ids = self._check(ids)
        T = ids.shape[0]
        pos0 = self.pos
        bufs = self._buffers(T)
        eps = self.config.rms_norm_eps
        embed(self.embed, ids, bufs.x)
        for i, layer in enumerate(self.layers):
            rmsnorm(bufs.x3, layer.attn_norm, eps, bufs.xn3)
            self._attention(i, layer, bufs, pos0)
            np.add(bufs.x, bufs.y, out=bufs.x)
            rmsnorm(bufs.x3, layer.ffn_norm, eps, bufs.xn3)
            if layer.spec.moe:
                self._moe(i, layer, bufs)
            else:
                self._mlp(layer.mlp, bufs.xn, bufs.y, bufs)
            np.add(bufs.x, bufs.y, out=bufs.x)
        self._ids[pos0: pos0 + T] = ids
        self.pos = pos0 + T
        self._tokens += T
        self.experts.end_token(T)
        if last_only:
            rows, logits = slice(T - 1, T), bufs.logits
        else:
            rows, logits = slice(0, T), np.empty((T, self.config.vocab_size), F32)
        rmsnorm(bufs.x3[rows], self.norm, eps, bufs.xn3[rows])
        linear(self.lm_head, bufs.xn[rows], logits, self._scratch)
        return logits

    def generate_tokens(self, ids, **options):
        """Iterator of generated token ids; options as moe.runtime.generate.generate_tokens takes them."""
        from .generate import generate_tokens

        return generate_tokens(self, ids, **options)

    def generate(self, prompt: str, **options):
        """Iterator of text pieces; options as moe.runtime.generate.generate takes them."""
        from .generate import generate

        return generate(self, prompt, **options)

    def close(self) -> None:
        self.experts.close()
        self.layout.close()

    # -- the forward pass -----------------------------------------------------------------------

    def _check(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        V = self.config.vocab_size
        if ids.ndim != 1 or ids.size == 0:
            raise MoeError(f"token ids must be a non-empty 1-D sequence, not shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= V:
            bad = ids[(ids < 0) | (ids >= V)][0]
            raise MoeError(f"token id {bad} is outside the vocabulary (0..{V - 1}); use this model's tokenizer")
        if self.pos + ids.size > self.max_context:
            raise MoeError(
                f"{self.pos + ids.size} tokens exceed the context of {self.max_context}; shorten the prompt "
                f"(or load the model with a larger max_context, at most {self.config.max_position_embeddings})"
            )
        return ids

    def _buffers(self, T: int) -> _Buffers:
        if T == 1:
            return self._decode
        if self._prefill is None or self._prefill.T != T:
            self._prefill = _Buffers(self.config, T, self._widths)
        return self._prefill

    def _offset_norms(self, offset: float) -> None:
        """Weights stored as w - offset (Qwen3.5's RMSNorm scales by 1 + weight) as the scale itself, in f32 as
        transformers adds them."""
        self.norm = self.norm + F32(offset)
        for layer in self.layers:
            for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm"):
                if getattr(layer, name) is not None:
                    setattr(layer, name, getattr(layer, name) + F32(offset))

    def _absorb(self, layer: _Layer) -> None:
        """kv_b as two f32 per-head stacks (the weights as linear reads them: kv_b times the identity), so latent
        attention never expands the cached latents into keys and values."""
        cfg = self.config
        nh, r, nope = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim
        w = np.zeros((r, layer.kv_b.shape[0]), F32)
        linear(layer.kv_b, np.eye(r, dtype=F32), w, self._scratch)  # (r, nh * (nope + v)) = kv_b^T
        w = w.T.reshape(nh, nope + cfg.v_head_dim, r)
        layer.absorb_q = np.ascontiguousarray(w[:, :nope].transpose(0, 2, 1))
        layer.absorb_o = np.ascontiguousarray(w[:, nope:])

    def _attention(self, i: int, layer: _Layer, bufs: _Buffers, pos0: int) -> None:
        cfg, spec = self.config, layer.spec
        if spec.attention == "linear":
            self._linear_attention(i, layer, bufs)
            return
        if cfg.attention_kind == "mla":
            self._latent_attention(i, layer, bufs, pos0)
            return
        eps = cfg.rms_norm_eps
        linear(layer.qkv, bufs.xn, bufs.qkv, self._scratch)
        if layer.qkv_bias is not None:
            np.add(bufs.qkv, layer.qkv_bias, out=bufs.qkv)
        if spec.qk_norm == "head":
            rmsnorm(bufs.q, layer.q_norm, eps, bufs.q)
            rmsnorm(bufs.k, layer.k_norm, eps, bufs.k)
        elif spec.qk_norm == "full":
            rmsnorm(bufs.q_flat, layer.q_norm, eps, bufs.q_flat)
            rmsnorm(bufs.k_flat, layer.k_norm, eps, bufs.k_flat)
        if cfg.clip_qkv is not None:
            np.clip(bufs.qkv, -cfg.clip_qkv, cfg.clip_qkv, out=bufs.qkv)
        if spec.rope:
            rope.rotate(bufs.q, pos0, self._cos, self._sin, cfg.rope.interleaved)
            rope.rotate(bufs.k, pos0, self._cos, self._sin, cfg.rope.interleaved)
        if spec.qk_norm == "l2":
            rmsnorm(bufs.q, self._ones, eps, bufs.q)
            rmsnorm(bufs.k, self._ones, eps, bufs.k)
        if spec.attn_temperature:
            temperature(bufs.q, pos0, cfg.attn_scale, cfg.floor_scale)
        k_cache, v_cache = self._k[i], self._v[i]  # (nkv, P, hd)
        cache_rows(bufs.k, k_cache, pos0, self._ks[i])
        cache_rows(bufs.v, v_cache, pos0, self._vs[i])
        window = spec.window if spec.attention == "sliding" else 0
        chunk = spec.window if spec.attention == "chunked" else 0
        sinks = self._no_sinks if layer.sinks is None else layer.sinks
        attend(bufs.q, k_cache, v_cache, pos0, cfg.softmax_scale, window, chunk, sinks, layer.sinks is not None,
               bufs.attn, self._ks[i], self._vs[i])
        if cfg.attn_output_gate:
            bufs.attn *= 1.0 / (1.0 + np.exp(-bufs.gate))
        linear(layer.o, bufs.attn.reshape(bufs.T, -1), bufs.y, self._scratch)
        if layer.o_bias is not None:
            np.add(bufs.y, layer.o_bias, out=bufs.y)

    def _latent_attention(self, i: int, layer: _Layer, bufs: _Buffers, pos0: int) -> None:
        """Multi-head latent attention in its absorbed form, prefill and decode alike: a head's unrotated q is taken
        into the latent's space through kv_b's k rows, so all heads attend over the cached rows (latent, RoPE key)
        as one shared kv head, and their latent outputs leave through kv_b's v rows."""
        cfg, m, scratch = self.config, bufs.latent, self._scratch
        r, nope = cfg.kv_lora_rank, cfg.qk_nope_head_dim
        if layer.q_a is not None:
            linear(layer.q_a, bufs.xn, m.q_lat, scratch)
            rmsnorm(m.q_lat[:, None], layer.q_a_norm, cfg.latent_norm_eps, m.q_lat[:, None])
            linear(layer.q_b, m.q_lat, m.q.reshape(bufs.T, -1), scratch)
        else:
            linear(layer.q, bufs.xn, m.q.reshape(bufs.T, -1), scratch)
        linear(layer.kv_a, bufs.xn, m.kv_a, scratch)
        latent, k_rope = m.kv_a[:, None, :r], m.kv_a[:, None, r:]  # (T, 1, r), (T, 1, rope)
        rmsnorm(latent, layer.kv_a_norm, cfg.latent_norm_eps, latent)
        rope.rotate(m.q[:, :, nope:], pos0, self._cos, self._sin, cfg.rope.interleaved)
        rope.rotate(k_rope, pos0, self._cos, self._sin, cfg.rope.interleaved)
        per_head(m.q[:, :, :nope], layer.absorb_q, m.q_abs[:, :, :r])
        m.q_abs[:, :, r:] = m.q[:, :, nope:]
        cache, scales = self._k[i], self._ks[i]  # (1, P, r + rope), (1, P)
        cache_rows(m.kv_a[:, None], cache, pos0, scales)
        attend(m.q_abs, cache, cache, pos0, cfg.softmax_scale, 0, 0, self._no_sinks, False, m.attn_lat, scales, scales)
        per_head(m.attn_lat[:, :, :r], layer.absorb_o, m.attn)
        linear(layer.o, m.attn.reshape(bufs.T, -1), bufs.y, scratch)

    def _linear_attention(self, i: int, layer: _Layer, bufs: _Buffers) -> None:
        """Gated DeltaNet: q, k, v through the causal convolution, then the gated delta rule on layer i's state
        (chunked for a prompt, stepwise for one token), normalized per head and gated by silu(z)."""
        cfg, m, n = self.config, bufs.linear, self._state_of[i]
        linear(layer.linear_in, bufs.xn, m.proj, self._scratch)
        deltanet.causal_conv_silu(m.mixed, layer.conv_taps, self._conv_state[n], m.conv)
        deltanet.l2norm(m.q)
        deltanet.l2norm(m.k)
        deltanet.gates(m.a, m.b, layer.linear_a_log, layer.linear_dt_bias, m.g, m.beta)
        rule = deltanet.delta_rule_step if bufs.T == 1 else deltanet.delta_rule_chunked
        rule(m.q, m.k, m.v, m.g, m.beta, cfg.linear_key_head_dim**-0.5, self._recurrent[n], m.out)
        rmsnorm(m.out, layer.linear_norm, cfg.rms_norm_eps, m.out)
        deltanet.silu_gate(m.out, m.z)
        linear(layer.o, m.out.reshape(bufs.T, -1), bufs.y, self._scratch)

    def _moe(self, i: int, layer: _Layer, bufs: _Buffers) -> None:
        """Router (f32) and top-k, then each chosen expert once over the tokens routed to it."""
        cfg = self.config
        k = cfg.top_k
        linear(layer.router, bufs.xn, bufs.router, self._scratch)
        if layer.router_bias is not None:
            np.add(bufs.router, layer.router_bias, out=bufs.router)
        if cfg.router == "softmax_topk":
            softmax_topk(bufs.router, k, cfg.norm_topk_prob, bufs.idx, bufs.w)
            if cfg.routed_scaling_factor != 1.0:  # DeepSeek-V2
                bufs.w *= np.float32(cfg.routed_scaling_factor)
        elif cfg.router == "softmax_group_topk":
            softmax_group_topk(bufs.router, k, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor, bufs.idx, bufs.w)
        elif cfg.router == "topk_softmax":
            topk_softmax(bufs.router, k, bufs.idx, bufs.w)
        elif cfg.router == "sigmoid_group_topk":
            sigmoid_group_topk(bufs.router, layer.router_correction, k, cfg.n_group, cfg.topk_group,
                               cfg.norm_topk_prob, cfg.routed_scaling_factor, bufs.idx, bufs.w)
        else:
            sigmoid_topk(bufs.router, k, bufs.idx, bufs.w)
        if self.routing_trace is not None:
            self.routing_trace.append((i, bufs.idx.copy(), bufs.w.copy()))
        n_active = group_by_expert(bufs.idx, cfg.num_experts, bufs.offsets, bufs.order, bufs.active, self._uses[i])
        self.experts.begin_layer(i, bufs.active[:n_active].tolist())
        if bufs.T == 1 and self.experts.wants_prediction and self._next_moe[i] >= 0:
            self._predict(self._next_moe[i], bufs)
        if layer.shared is not None:
            self._mlp(layer.shared, bufs.xn, bufs.y, bufs)
            if layer.shared_gate is not None:
                linear(layer.shared_gate, bufs.xn, bufs.shared_gate, self._scratch)
                bufs.y *= 1.0 / (1.0 + np.exp(-bufs.shared_gate))
        else:
            bufs.y[:] = 0.0
        scale_input = cfg.router == "sigmoid_topk"  # Llama 4 weighs the expert's input, the others its output
        active = bufs.active[:n_active].tolist()
        if bufs.T == 1 and n_active == k:  # decode: the k experts side by side, one pair each
            groups = [(active, 0, k)]
        else:  # each chosen expert once, over the tokens routed to it
            groups = [([e], int(bufs.offsets[e]), int(bufs.offsets[e + 1])) for e in active]
        for experts, lo, hi in groups:
            self._experts_ffn(i, experts, lo, hi, bufs, scale_input)

    def _experts_ffn(self, i: int, experts: list[int], lo: int, hi: int, bufs: _Buffers, scale_input: bool) -> None:
        """The (token, slot) pairs order[lo:hi] through layer i's `experts`: one expert over all of them, or
        expert j on pair j (one compiled call per projection for a token's k experts); added into bufs.y."""
        cfg, n = self.config, hi - lo
        ws = [self.experts.get(i, e) for e in experts]
        rows = [slice(j, j + 1) for j in range(n)] if len(ws) > 1 else [slice(0, n)]  # each expert's, for biases
        gate_up_buf, act_buf = bufs.hidden[cfg.expert_intermediate_size]
        xe, ye, gate_up, act = bufs.xe[:n], bufs.ye[:n], gate_up_buf[:n], act_buf[:n]
        gather(bufs.xn, bufs.order, cfg.top_k, lo, hi, bufs.w, scale_input, xe)
        self._project([w.gate_up for w in ws], xe, gate_up)
        if ws[0].gate_up_bias is not None:
            for r, w in zip(rows, ws, strict=True):
                np.add(gate_up[r], w.gate_up_bias, out=gate_up[r])
        if cfg.activation == "gpt_oss":
            swiglu_clamped(gate_up, cfg.swiglu_alpha, cfg.swiglu_limit, act)
        else:
            swiglu(gate_up, act)
        self._project([w.down for w in ws], act, ye)
        if ws[0].down_bias is not None:
            for r, w in zip(rows, ws, strict=True):
                np.add(ye[r], w.down_bias, out=ye[r])
        scatter_add(ye, bufs.order, cfg.top_k, lo, hi, bufs.w, not scale_input, bufs.y)

    def _project(self, weights: list[Packed], x: np.ndarray, out: np.ndarray) -> None:
        """One weight over every row of x, or weight j on row j."""
        if len(weights) == 1:
            linear(weights[0], x, out, self._scratch)
        else:
            linear_each(weights, x, out, self._scratch)

    def _predict(self, j: int, bufs: _Buffers) -> None:
        """Layer j's router applied to the current hidden state: the experts to read while this layer computes."""
        layer = self.layers[j]
        rmsnorm(bufs.x3, layer.ffn_norm, self.config.rms_norm_eps, self._guess_xn.reshape(1, 1, -1))
        linear(layer.router, self._guess_xn, self._guess, self._scratch)
        if layer.router_bias is not None:
            np.add(self._guess, layer.router_bias, out=self._guess)
        if layer.router_correction is not None:  # sigmoid_group_topk chooses by score + correction
            self._guess[:] = 1.0 / (1.0 + np.exp(-self._guess)) + layer.router_correction
        k = self.config.top_k
        self.experts.prefetch(j, np.argpartition(-self._guess[0], k - 1)[:k].tolist())

    def _mlp(self, weights: tuple[Packed, Packed], x: np.ndarray, out: np.ndarray, bufs: _Buffers) -> None:
        """A SwiGLU MLP (dense layer or shared expert) over all T tokens: out = down(silu(gate x) * up x)."""
        gate_up, down = weights
        gate_up_buf, act_buf = (h[: x.shape[0]] for h in bufs.hidden[gate_up.shape[0] // 2])
        linear(gate_up, x, gate_up_buf, self._scratch)
        swiglu(gate_up_buf, act_buf)
        linear(down, act_buf, out, self._scratch)


def load_model(path, memory_budget=None, threads: int | None = None, max_context: int | None = None,
               cache_policy: str = "next", prefetch: bool | None = None, pin=(), kv_cache: str = "auto") -> Model:
    """Open a converted model (a folder, or a name or Hub id converted before) and map its files; copies no expert.

    memory_budget (bytes or text such as "2GB") bounds the expert cache: experts are then paged
    into a fixed pool (cache_policy "next", "freq" or "lru": paging.POLICIES). Without one, experts come
    straight from the memory map when the model fits in available RAM, else a budget is chosen. How the experts
    are held, with prefetch (True, False, or None for when misses come from disk) and `pin` (pairs or a profile
    file), is budget.decide's decision, kept as `model.memory` with the lines to tell the user (its notes:
    load_model prints nothing). threads sets numba's thread
    count (default: machine.default_threads()); max_context sizes the KV cache (default: the model's, at most 4096)
    and kv_cache says how it holds keys and values: "auto" (bfloat16 for a quantized model, float32 for a 16-bit
    one), "f32", "bf16" or "q8" (int8 codes and a scale per row: half bfloat16's bytes, not exact).
    Every tensor is checked against its CRC-32 before first use: the non-expert ones here, each expert
    the first time it is chosen (a mismatch: MoeError, exit 1).
    """
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        from .home import resolve_model

        folder = resolve_model(str(path))
    use_threads(threads)
    layout = open_layout(folder)
    cfg = layout.config
    if max_context is None:
        max_context = min(cfg.max_position_embeddings, DEFAULT_MAX_CONTEXT)
    elif not 1 <= max_context <= cfg.max_position_embeddings:
        raise MoeError(f"max_context {max_context} must be between 1 and the model's {cfg.max_position_embeddings}")
    kv_dtype = layout.kv_cache_dtype(kv_cache)
    memory = decide(layout, memory_budget, prefetch, pin, max_context, kv_dtype)
    if memory.hold_weights:
        layout.hold(MODEL_FILE)
    layout.check_tensors()  # every non-expert tensor is used by the first token; experts as they are first chosen
    if memory.paged:
        experts: ExpertStore = PagedExperts(layout, memory.budget, cache_policy, memory.prefetch, memory.pins,
                                            memory.uncached)
    else:
        experts = MappedExperts(layout)
    model = Model(layout, experts, memory, max_context, kv_dtype)
    if kernels.cache_is_cold():
        kernels.announce_compiling()
        _warm_up(model)
        kernels.mark_cache_warm()
    return model


def _warm_up(model: Model) -> None:
    """Compile (and cache on disk) every kernel the prefill and decode paths use, then forget the run."""
    if model.max_context >= 3:
        model.forward(np.zeros(2, np.int64))
        model.forward(np.zeros(1, np.int64), last_only=True)
    model.reset()
    model._tokens = 0
    model._uses[:] = 0
    model.experts.reset_counters()
