"""A random-weight OLMoE checkpoint of any size in the Hub layout, for benchmarks: `python -m moe.convert.synthetic OUT`.

The default geometry is OLMoE-1B-7B's (16 layers, hidden 2048, 64 experts of width 1024, top-8,
vocabulary 50304, 16 heads): about 14 GB of bf16 in ~5 GB shards. Tensors are written straight
into the shard files a few MB at a time, so memory stays small whatever the size. The
tokenizer is tinymix's (vocabulary 4096): enough to run and time the model, not to make sense.

Random weights route sticky: the residual stream soon forgets which token came in, so consecutive tokens
pick much the same experts. `embed_scale` (a power of two) makes the embeddings dominate the residual
stream instead, so each token routes by its own id: little reuse between random tokens. Real text lies
between the two.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np

GEOMETRIES = {
    "olmoe-1b-7b": dict(num_hidden_layers=16, hidden_size=2048, num_experts=64, intermediate_size=1024,
                        num_experts_per_tok=8, vocab_size=50304, num_attention_heads=16, num_key_value_heads=16),
}
SHARD_BYTES = 5 * 10**9
_WRITE_ELEMENTS = 16 << 20  # generated and written this many values at a time
_TOKENIZER = Path(__file__).parent / "demo" / "tinymix"
EMBEDDINGS = "model.embed_tokens.weight"


def _tensors(g: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order transformers saves an OLMoE model."""
    H, F, V, E = g["hidden_size"], g["intermediate_size"], g["vocab_size"], g["num_experts"]
    hd = H // g["num_attention_heads"]
    q, kv = g["num_attention_heads"] * hd, g["num_key_value_heads"] * hd
    out = [(EMBEDDINGS, (V, H))]
    for i in range(g["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "self_attn.q_proj.weight", (q, H)), (p + "self_attn.k_proj.weight", (kv, H)),
                (p + "self_attn.v_proj.weight", (kv, H)), (p + "self_attn.o_proj.weight", (H, q)),
                (p + "self_attn.q_norm.weight", (q,)), (p + "self_attn.k_norm.weight", (kv,)),
                (p + "mlp.gate.weight", (E, H))]
        for j in range(E):
            e = f"{p}mlp.experts.{j}."
            out += [(e + "gate_proj.weight", (F, H)), (e + "up_proj.weight", (F, H)), (e + "down_proj.weight", (H, F))]
    return out + [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]


def _random_bf16(rng: np.random.Generator, n: int, fan_in: int, scale: int = 1) -> np.ndarray:
    """n bf16 words of random sign and mantissa, magnitudes within 1/8..2 of scale/sqrt(fan_in)."""
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
    top = 127 + round(math.log2(scale / math.sqrt(fan_in)))
    exponent = (top - ((bits >> 7) & 3)).astype(np.uint16) << 7
    return (bits & 0x807F) | exponent


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator,
                 embed_scale: int) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in tensors:
            n = math.prod(shape)
            scale = embed_scale if name == EMBEDDINGS else 1
            if len(shape) == 1:  # norm weights: 1.0
                f.write(np.full(n, 0x3F80, np.uint16).tobytes())
                continue
            for start in range(0, n, _WRITE_ELEMENTS):
                f.write(_random_bf16(rng, min(_WRITE_ELEMENTS, n - start), shape[1], scale).tobytes())


def write_synthetic_checkpoint(folder, geometry: str | dict = "olmoe-1b-7b", seed: int = 0,
                               shard_bytes: int = SHARD_BYTES, embed_scale: int = 1) -> Path:
    """Write a random bf16 OlmoeForCausalLM checkpoint (config, shards, index, tokenizer) into `folder`."""
    g = dict(GEOMETRIES[geometry] if isinstance(geometry, str) else geometry)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, shape in _tensors(g):
        n = 2 * math.prod(shape)
        if size and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / fname, tensors, rng, embed_scale)
        weight_map.update(dict.fromkeys((name for name, _ in tensors), fname))
    total = sum(2 * math.prod(shape) for tensors in shards for _, shape in tensors)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False, "clip_qkv": None,
        "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 4096, "norm_topk_prob": False,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3, **g,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(_TOKENIZER / name, folder / name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--geometry", default="olmoe-1b-7b", choices=sorted(GEOMETRIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-scale", type=int, default=1,
                    help="embeddings this many times larger (a power of two): each token then routes by its own id")
    args = ap.parse_args()
    write_synthetic_checkpoint(args.out, args.geometry, args.seed, embed_scale=args.embed_scale)
    print(args.out)


if __name__ == "__main__":
    main()
