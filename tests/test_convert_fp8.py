"""FP8 block-scaled checkpoints (DeepSeek-V3's, Qwen3's and GLM-4.5's on the Hub): each quantized matrix F8_E4M3 codes
beside a `*_scale_inv` per block. Converted at 16 bits they give exactly what the same model stored as its dequantized
float32 values gives (transformers' own FP8 path needs a GPU); at 4 bits they follow 16 bits; bad ones fail clearly."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from moe.convert import convert, plan
from moe.convert import converter as converter_module
from moe.convert.fp8 import E4M3_VALUES, dequantize
from moe.runtime import load_model
from moe.runtime.errors import MoeError
from moe.runtime.layout import EXPERTS_FILE, MODEL_FILE
from safetensors.torch import load_file, save_file
from tiny import make_checkpoint

BLOCK = [16, 24]  # rows of 40 (expert width) and columns of 64 (hidden size) end in a partial block
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
INDEX = "model.safetensors.index.json"


def quantize_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., R, C) float -> float8_e4m3fn codes and float32 scales (..., ceil(R / b0), ceil(C / b1)): each block's
    largest magnitude at FP8_MAX, as DeepSeek's and Qwen's quantizers do."""
    *lead, rows, cols = w.shape
    nr, nc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(*lead, nr * block[0], nc * block[1])
    padded[..., :rows, :cols] = w.float()
    blocks = padded.reshape(*lead, nr, block[0], nc, block[1])
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (blocks / scale[..., :, None, :, None]).reshape(*lead, nr * block[0], nc * block[1])
    return scaled[..., :rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The float32 values of codes times their blocks' scales, written independently of moe.convert.fp8."""
    rows, cols = codes.shape[-2:]
    s = scale.float().repeat_interleave(block[0], dim=-2).repeat_interleave(block[1], dim=-1)
    return codes.float() * s[..., :rows, :cols]


def quantized(name: str, t: torch.Tensor) -> bool:
    """What the Hub's FP8 checkpoints quantize: the linear layers' weights (fused experts too); embeddings, the
    head, routers, norms and the convolution stay as they are."""
    return (t.ndim == 2 and name.endswith("proj.weight")) or (t.ndim == 3 and name.endswith(("gate_up_proj",
                                                                                               "down_proj")))


def rewrite(folder, change) -> None:
    """Each shard's tensors replaced by change(tensors) -> tensors, and the index made to match."""
    index = json.loads((folder / INDEX).read_text())
    weight_map = {}
    for fname in sorted(set(index["weight_map"].values())):
        tensors = change(load_file(folder / fname))
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
    index["weight_map"] = weight_map
    (folder / INDEX).write_text(json.dumps(index, indent=2))


def edit_config(folder, **quantization) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {**config["quantization_config"], **quantization}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def fp8_pair(arch: str, root, scale_dtype=torch.float32):
    """(FP8 checkpoint, the same weights dequantized to float32) of a tiny two-shard `arch`; the rest as saved."""
    base = make_checkpoint(arch, root / "base", shards=2)
    fp8, f32 = shutil.copytree(base, root / "fp8"), shutil.copytree(base, root / "f32")
    scaled = {}

    def to_fp8(tensors):
        out = {}
        for name, t in tensors.items():
            if quantized(name, t):
                codes, scale = quantize_fp8(t, BLOCK)
                out[name], out[name + "_scale_inv"] = codes, scale.to(scale_dtype)
                scaled[name] = dequantize_fp8(codes, out[name + "_scale_inv"], BLOCK)
            else:
                out[name] = t
        return out

    rewrite(fp8, to_fp8)
    rewrite(f32, lambda tensors: {n: scaled.get(n, t) for n, t in tensors.items()})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": BLOCK}
    (fp8 / "config.json").write_text(json.dumps(config, indent=2))
    return fp8, f32


CASES = {  # separate experts; fused experts under the multimodal layout (quantization_config beside text_config)
    "deepseek_v3": ("deepseek_v3", torch.float32),
    "qwen3_5_moe": ("qwen3_5_moe", torch.float32),
    "qwen3_5_moe_multimodal-bf16_scales": ("qwen3_5_moe_multimodal", torch.bfloat16),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, scale_dtype = CASES[request.param]
    return fp8_pair(arch, tmp_path_factory.mktemp(request.param), scale_dtype)


def layout_bytes(folder) -> tuple[bytes, bytes]:
    return (folder / MODEL_FILE).read_bytes(), (folder / EXPERTS_FILE).read_bytes()


def test_sixteen_bits_equal_the_dequantized_float32_checkpoint(pair, tmp_path, monkeypatch):
    fp8, f32 = pair
    assert any(n.endswith("_scale_inv") for n in json.loads((fp8 / INDEX).read_text())["weight_map"])
    want = layout_bytes(convert(f32, tmp_path / "f32", bits=16))
    assert layout_bytes(convert(fp8, tmp_path / "fp8", bits=16)) == want
    manifest = json.loads((tmp_path / "fp8" / "manifest.json").read_text())
    encodings = {n: e["encoding"] for n, e in manifest["tensors"].items()}
    assert {e for n, e in encodings.items() if ".experts." in n} == {"f32"}  # FP8 times a float32 scale
    assert {e for n, e in encodings.items() if n.endswith(".router")} == {"bf16"}  # stored as it is
    monkeypatch.setattr(converter_module, "ROW_BLOCK_BYTES", 1024)  # FP8 matrices in blocks of 4 rows: mid-block
    assert layout_bytes(convert(fp8, tmp_path / "rows", bits=16)) == want


def test_four_bits_follow_sixteen(pair, tmp_path):
    fp8, f32 = pair
    q4 = convert(fp8, tmp_path / "q4", bits=4)
    assert layout_bytes(q4) == layout_bytes(convert(f32, tmp_path / "f32-q4", bits=4))
    ids = np.random.default_rng(0).integers(4, 4096, 21)
    exact = load_model(convert(fp8, tmp_path / "f16", bits=16)).logits(ids)
    corr = np.corrcoef(exact.ravel(), load_model(q4).logits(ids).ravel())[0, 1]
    assert corr > 0.96  # as bf16 sources at 4 bits (test_fidelity)


def test_plan_counts_one_byte_per_fp8_weight(pair, tmp_path):
    fp8, _ = pair
    hf, headers = plan.read_source(str(fp8))
    fig = plan.figures(hf, headers, 4)
    tensors = {n: t for f in fp8.glob("*.safetensors") for n, t in load_file(f).items()}
    assert any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    assert fig["source_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    out = convert(fp8, tmp_path / "q4", bits=4)
    assert fig["layout_bytes"] == (out / MODEL_FILE).stat().st_size + (out / EXPERTS_FILE).stat().st_size


def test_decode_table_is_torchs_float8_e4m3fn():
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(E4M3_VALUES, want)  # NaN where torch has NaN (0x7F, 0xFF)
    assert np.isnan(E4M3_VALUES).sum() == 2
    assert (np.signbit(E4M3_VALUES) == np.signbit(want))[~np.isnan(want)].all()  # -0.0 included


def test_dequantize_a_row_range_of_ragged_blocks():
    w = torch.randn(45, 50)
    codes, scale = quantize_fp8(w, BLOCK)
    want = dequantize_fp8(codes, scale, BLOCK).numpy()
    raw = codes.view(torch.uint8).numpy()
    for r0, r1 in ((0, 45), (5, 20), (16, 17), (40, 45)):
        got = dequantize(raw[r0:r1], scale.numpy(), BLOCK, r0)
        np.testing.assert_array_equal(got, want[r0:r1])


# ---- bad input: one line, exit code 2, nothing left behind


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return fp8_pair("qwen3_moe", tmp_path_factory.mktemp("good"))[0]


@pytest.fixture
def src(good, tmp_path):
    return shutil.copytree(good, tmp_path / "src")


def fails(src, out, match):
    with pytest.raises(MoeError, match=match) as info:
        convert(src, out, bits=4)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return str(info.value)


WEIGHT = "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("quantization, match", [
    ({"fmt": "e5m2"}, "config.json: FP8 format 'e5m2'; moe converts e4m3"),
    ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors' but the weights are FP8"),
    ({"weight_block_size": [128]}, r"weight_block_size \[128\]"),
    ({"weight_block_size": [32, 32]}, r"q_proj.weight_scale_inv \[6, 3\] does not scale model.layers.0.self_attn."
                                      r"q_proj.weight \[96, 64\] in blocks of \[32, 32\] \(which takes \[3, 2\]\); "
                                      "config.json's weight_block_size does not match"),
])
def test_bad_quantization_config(src, tmp_path, quantization, match):
    edit_config(src, **quantization)
    fails(src, tmp_path / "out", match)


def test_fp8_weights_without_quantization_config(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path / "out", "the weights are FP8 .* but there is no quantization_config")


def test_e5m2_weights(src, tmp_path):
    rewrite(src, lambda ts: {n: t.view(torch.float8_e5m2) if n == WEIGHT else t for n, t in ts.items()})
    fails(src, tmp_path / "out", f"tensor {WEIGHT} has dtype F8_E5M2; moe converts FP8 weights stored as F8_E4M3")


def test_missing_scales(src, tmp_path):
    rewrite(src, lambda ts: {n: t for n, t in ts.items() if n != WEIGHT + "_scale_inv"})
    fails(src, tmp_path / "out", f"tensor {WEIGHT} is FP8 \\(F8_E4M3\\) but its scales {WEIGHT}_scale_inv are missing")


def test_nan_codes(src, tmp_path):
    def poison(ts):
        codes = ts[WEIGHT].view(torch.uint8).clone() if WEIGHT in ts else None
        if codes is not None:
            codes[3, 5], codes[60, 63] = 0x7F, 0xFF
            ts[WEIGHT] = codes.view(torch.float8_e4m3fn)
        return ts

    rewrite(src, poison)
    fails(src, tmp_path / "out", f"tensor {WEIGHT} holds 2 FP8 NaN codes; the checkpoint is corrupt")


def test_scales_of_another_dtype(src, tmp_path):
    rewrite(src, lambda ts: {n: t.half() if n == WEIGHT + "_scale_inv" else t for n, t in ts.items()})
    fails(src, tmp_path / "out", f"tensor {WEIGHT}_scale_inv has dtype F16, which moe cannot convert as FP8 scales")


def test_unexpected_scales_are_named(src, tmp_path):
    rewrite(src, lambda ts: {**ts, "model.layers.0.self_attn.x_proj.weight_scale_inv": torch.ones(1, 1)}
            if WEIGHT in ts else ts)
    fails(src, tmp_path / "out", "tensor model.layers.0.self_attn.x_proj.weight_scale_inv not expected")


def test_fp8_that_is_not_a_matrix(src, tmp_path):
    norm = "model.layers.0.input_layernorm.weight"
    rewrite(src, lambda ts: {**ts, norm: ts[norm].to(torch.float8_e4m3fn), norm + "_scale_inv": torch.ones(1)}
            if norm in ts else ts)
    fails(src, tmp_path / "out", rf"tensor {norm} \[64\] has FP8 scales but is not the matrix config.json implies")
