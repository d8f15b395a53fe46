"""A random-weight MoE checkpoint of any size in the Hub layout, for benchmarks: `python -m moe.convert.synthetic OUT`.

Two geometries, each in its architecture's own layout:
- `olmoe-1b-7b` (`OlmoeForCausalLM`: 16 layers, hidden 2048, 64 experts of width 1024, top-8, vocabulary 50304,
  16 heads): about 14 GB of bf16.
- `qwen3.5-35b-a3b` (`Qwen3_5MoeForCausalLM`: 40 layers, three of four Gated DeltaNet, hidden 2048, 256 experts of
  width 512 and a shared one, top-8, vocabulary 248320): ~70 GB of bf16, so `--fp8` writes its linear layers as the
  Hub's FP8 checkpoints do (e4m3 codes with a float32 scale per 128 x 128 block): ~36 GB.
Tensors are written straight into ~5 GB shard files a few MB at a time, so memory stays small whatever the
size. The tokenizer is tinymix's (vocabulary 4096): enough to run and time the model, not to make sense.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GEOMETRIES = {
    "olmoe-1b-7b": dict(num_hidden_layers=16, hidden_size=2048, num_experts=64, intermediate_size=1024,
                        num_experts_per_tok=8, vocab_size=50304, num_attention_heads=16, num_key_value_heads=16),
    "qwen3.5-35b-a3b": dict(architecture="qwen3_5_moe", num_hidden_layers=40, hidden_size=2048, num_experts=256,
                            moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=8,
                            vocab_size=248320, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                            linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                            linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4),
}
SHARD_BYTES = 5 * 10**9
FP8_BLOCK = 128  # rows and columns sharing one scale, as the Hub's FP8 checkpoints have them
_WRITE_ELEMENTS = 16 << 20  # generated and written this many values at a time
_TOKENIZER = Path(__file__).parent / "demo" / "tinymix"
EMBEDDINGS = "model.embed_tokens.weight"
# stay 16-bit in the Hub's FP8 checkpoints: the vocabulary's two tables, routers, gates of one row
_NOT_FP8 = (EMBEDDINGS, "lm_head.weight", "mlp.gate.weight", "shared_expert_gate.weight", "in_proj_a.weight",
            "in_proj_b.weight")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    fill: str = "random"  # or a constant: "one", "zero"
    dtype: str = "BF16"  # or F8_E4M3, F32 (its block scales)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"BF16": 2, "F8_E4M3": 1, "F32": 4}[self.dtype]


def _olmoe(g: dict) -> list[Tensor]:
    """Every tensor, in the order transformers saves an OLMoE model."""
    H, F, V, E = g["hidden_size"], g["intermediate_size"], g["vocab_size"], g["num_experts"]
    hd = H // g["num_attention_heads"]
    q, kv = g["num_attention_heads"] * hd, g["num_key_value_heads"] * hd
    out = [Tensor(EMBEDDINGS, (V, H))]
    for i in range(g["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [Tensor(p + "input_layernorm.weight", (H,), "one"),
                Tensor(p + "post_attention_layernorm.weight", (H,), "one"),
                Tensor(p + "self_attn.q_proj.weight", (q, H)), Tensor(p + "self_attn.k_proj.weight", (kv, H)),
                Tensor(p + "self_attn.v_proj.weight", (kv, H)), Tensor(p + "self_attn.o_proj.weight", (H, q)),
                Tensor(p + "self_attn.q_norm.weight", (q,), "one"), Tensor(p + "self_attn.k_norm.weight", (kv,), "one"),
                Tensor(p + "mlp.gate.weight", (E, H))]
        out += _experts(p + "mlp.", E, F, H)
    return out + [Tensor("model.norm.weight", (H,), "one"), Tensor("lm_head.weight", (V, H))]


def _experts(mlp: str, E: int, F: int, H: int) -> list[Tensor]:
    return [Tensor(f"{mlp}experts.{j}.{name}", shape) for j in range(E)
            for name, shape in (("gate_proj.weight", (F, H)), ("up_proj.weight", (F, H)), ("down_proj.weight", (H, F)))]


def _qwen3_5_moe(g: dict) -> list[Tensor]:
    """Every tensor of Qwen3_5MoeForCausalLM. Its RMSNorms scale by 1 + weight, so they are stored as zeros, except
    the DeltaNet's output norm (weight as is)."""
    H, F, V, E = g["hidden_size"], g["moe_intermediate_size"], g["vocab_size"], g["num_experts"]
    S, hd, nh, nkv = g["shared_expert_intermediate_size"], g["head_dim"], g["num_attention_heads"], g["num_key_value_heads"]
    lk, nv = g["linear_num_key_heads"] * g["linear_key_head_dim"], g["linear_num_value_heads"]
    lv = nv * g["linear_value_head_dim"]
    out = [Tensor(EMBEDDINGS, (V, H))]
    for i in range(g["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if (i + 1) % g["full_attention_interval"]:
            a = p + "linear_attn."
            out += [Tensor(a + "in_proj_qkv.weight", (2 * lk + lv, H)), Tensor(a + "in_proj_z.weight", (lv, H)),
                    Tensor(a + "in_proj_b.weight", (nv, H)), Tensor(a + "in_proj_a.weight", (nv, H)),
                    Tensor(a + "conv1d.weight", (2 * lk + lv, 1, g["linear_conv_kernel_dim"])),
                    Tensor(a + "A_log", (nv,), "zero"), Tensor(a + "dt_bias", (nv,), "one"),
                    Tensor(a + "norm.weight", (g["linear_value_head_dim"],), "one"),
                    Tensor(a + "out_proj.weight", (H, lv))]
        else:
            a = p + "self_attn."
            out += [Tensor(a + "q_proj.weight", (2 * nh * hd, H)), Tensor(a + "k_proj.weight", (nkv * hd, H)),
                    Tensor(a + "v_proj.weight", (nkv * hd, H)), Tensor(a + "o_proj.weight", (H, nh * hd)),
                    Tensor(a + "q_norm.weight", (hd,), "zero"), Tensor(a + "k_norm.weight", (hd,), "zero")]
        mlp = p + "mlp."
        out += [Tensor(p + "input_layernorm.weight", (H,), "zero"),
                Tensor(p + "post_attention_layernorm.weight", (H,), "zero"), Tensor(mlp + "gate.weight", (E, H)),
                Tensor(mlp + "shared_expert.gate_proj.weight", (S, H)),
                Tensor(mlp + "shared_expert.up_proj.weight", (S, H)),
                Tensor(mlp + "shared_expert.down_proj.weight", (H, S)), Tensor(mlp + "shared_expert_gate.weight", (1, H))]
        out += _experts(mlp, E, F, H)
    return out + [Tensor("model.norm.weight", (H,), "zero"), Tensor("lm_head.weight", (V, H))]


def _config(g: dict) -> dict:
    """config.json for the geometry (its own fields, as given, are the architecture's config keys)."""
    fields = {k: v for k, v in g.items() if k != "architecture"}
    common = {"hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3}
    if _architecture(g) == "olmoe":
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
                "clip_qkv": None, "max_position_embeddings": 4096, "norm_topk_prob": False, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "rope_scaling": None, **common, **fields}
    return {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe_text", "attention_bias": False,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
            **common, **fields}


_ARCHITECTURES = {"olmoe": _olmoe, "qwen3_5_moe": _qwen3_5_moe}


def _architecture(g: dict) -> str:
    return g.get("architecture", "olmoe")


def _fp8(tensors: list[Tensor]) -> list[Tensor]:
    """Linear layers as e4m3 codes followed by their block scales; the rest as they were."""
    out = []
    for t in tensors:
        if len(t.shape) != 2 or t.fill != "random" or t.name.endswith(_NOT_FP8):
            out.append(t)
            continue
        blocks = tuple(-(-n // FP8_BLOCK) for n in t.shape)
        out += [Tensor(t.name, t.shape, dtype="F8_E4M3"), Tensor(t.name + "_scale_inv", blocks, dtype="F32")]
    return out


def _random_bf16(rng: np.random.Generator, n: int, fan_in: int, scale: int = 1) -> np.ndarray:
    """n bf16 words of random sign and mantissa, magnitudes within 1/8..2 of scale/sqrt(fan_in)."""
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16)
    top = 127 + round(math.log2(scale / math.sqrt(fan_in)))
    exponent = (top - ((bits >> 7) & 3)).astype(np.uint16) << 7
    return (bits & 0x807F) | exponent


def _random_e4m3(rng: np.random.Generator, n: int) -> np.ndarray:
    """n e4m3 codes of random sign and mantissa, magnitudes within 1/8..2 (exponent field 4..7 of bias 7: never
    the NaN code)."""
    bits = np.frombuffer(rng.bytes(n), np.uint8)
    return (bits & 0x87) | ((7 - ((bits >> 3) & 3)) << 3).astype(np.uint8)


_CONSTANT = {("one", "BF16"): 0x3F80, ("zero", "BF16"): 0}


def _write_shard(path: Path, tensors: list[Tensor], rng: np.random.Generator, embed_scale: int) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors:
            n, fan_in = math.prod(t.shape), math.prod(t.shape[1:])
            if t.fill != "random":
                f.write(np.full(n, _CONSTANT[t.fill, t.dtype], np.uint16).tobytes())
            elif t.dtype == "F32":  # an FP8 weight's block scales: its codes' magnitudes then match the bf16 ones'
                f.write(np.full(n, 1 / math.sqrt(t.shape[1] * FP8_BLOCK), np.float32).tobytes())
            else:
                for start in range(0, n, _WRITE_ELEMENTS):
                    m = min(_WRITE_ELEMENTS, n - start)
                    if t.dtype == "F8_E4M3":
                        f.write(_random_e4m3(rng, m).tobytes())
                    else:
                        f.write(_random_bf16(rng, m, fan_in, embed_scale if t.name == EMBEDDINGS else 1).tobytes())


def write_synthetic_checkpoint(folder, geometry: str | dict = "olmoe-1b-7b", seed: int = 0,
                               shard_bytes: int = SHARD_BYTES, embed_scale: int = 1, fp8: bool = False) -> Path:
    """Write a random checkpoint (config, shards, index, tokenizer) of `geometry` into `folder`: bf16, or with its
    linear layers in FP8 blocks (`fp8`)."""
    g = dict(GEOMETRIES[geometry] if isinstance(geometry, str) else geometry)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _ARCHITECTURES[_architecture(g)](g)
    if fp8:
        tensors = _fp8(tensors)
    shards, size = [[]], 0
    for t in tensors:
        if size and size + t.nbytes > shard_bytes and not t.name.endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(folder / fname, shard, rng, embed_scale)
        weight_map.update(dict.fromkeys((t.name for t in shard), fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}, indent=2))
    config = _config(g)
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
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
    ap.add_argument("--fp8", action="store_true", help="linear layers as FP8 blocks (e4m3, a float32 scale per 128 x 128)")
    ap.add_argument("--layers", type=int, help="fewer layers than the geometry's (each one as the geometry has it)")
    args = ap.parse_args()
    geometry = GEOMETRIES[args.geometry] | ({"num_hidden_layers": args.layers} if args.layers else {})
    write_synthetic_checkpoint(args.out, geometry, args.seed, embed_scale=args.embed_scale, fp8=args.fp8)
    print(args.out)


if __name__ == "__main__":
    main()
