"""The converted layout: experts page-aligned and contiguous, checksums, verify naming the tensor a flipped byte hit."""

import json
import math
import shutil

import pytest
from moe.convert import convert
from moe.runtime.layout import EXPERT_ALIGN, EXPERTS_FILE, MODEL_FILE, TENSOR_ALIGN, open_layout, verify
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """gpt-oss (expert biases) and Llama 4 (dense layers, shared expert) at 4 bits."""
    root = tmp_path_factory.mktemp("layout")
    return {name: convert(make_checkpoint(name, root / f"src-{name}"), root / name) for name in ("gpt_oss", "llama4")}


def spans(e):
    """(start, end) byte ranges of a tensor's codes and scales."""
    enc, shape = e["encoding"], e["shape"]
    if enc in ("f32", "bf16", "f16"):
        yield e["offset"], e["offset"] + math.prod(shape) * (4 if enc == "f32" else 2)
        return
    rows, cols = shape
    gs = e["group_size"]
    cp = -(-cols // gs) * gs
    bits = {"q4": 4, "q5": 5, "q6": 6, "q8": 8}[enc]
    groups = cp // gs
    yield e["offset"], e["offset"] + rows * cp * bits // 8
    yield e["scales_offset"], e["scales_offset"] + rows * (2 * -(-groups // 8) + groups)  # bfloat16 D, then int8 k


@pytest.mark.parametrize("name", ["gpt_oss", "llama4"])
def test_each_expert_is_one_aligned_contiguous_run(converted, name):
    layout = open_layout(converted[name])
    m = layout.manifest
    config = m["config"]
    expected_layers = [str(i) for i, spec in enumerate(config["layers"]) if spec["moe"]]
    assert sorted(m["experts"]) == expected_layers
    runs = []
    for layer, records in m["experts"].items():
        assert len(records) == config["num_experts"]
        for j, r in enumerate(records):
            assert r["offset"] % EXPERT_ALIGN == 0
            tensors = layout.expert_tensors(int(layer), j)
            expected = {"gate_up", "down"} | ({"gate_up_bias", "down_bias"} if config["expert_bias"] else set())
            assert set(tensors) == expected
            inside = sorted(s for e in tensors.values() for s in spans(e))
            assert inside[0][0] == r["offset"] and inside[-1][1] <= r["offset"] + r["nbytes"]
            assert all(e["file"] == EXPERTS_FILE for e in tensors.values())
            assert r["nbytes"] - (inside[-1][1] - r["offset"]) < TENSOR_ALIGN  # nothing else in the run
            runs.append((r["offset"], r["offset"] + r["nbytes"]))
    runs.sort()
    assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:], strict=False))  # runs never share a page
    assert all(-(-a[1] // EXPERT_ALIGN) * EXPERT_ALIGN <= b[0] for a, b in zip(runs, runs[1:], strict=False))
    for tensor, e in m["tensors"].items():
        if ".experts." not in tensor:
            assert e["file"] == MODEL_FILE and e["offset"] % TENSOR_ALIGN == 0, tensor
    assert m["files"][EXPERTS_FILE]["size"] % EXPERT_ALIGN == 0
    layout.close()


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_names_the_tensor_a_flipped_byte_hit(converted, tmp_path):
    folder = shutil.copytree(converted["gpt_oss"], tmp_path / "model")
    assert verify(folder) == []
    m = json.loads((folder / "manifest.json").read_text())
    down = m["tensors"]["layers.1.experts.2.down"]
    flip(folder / EXPERTS_FILE, down["offset"] + 5)
    qkv = m["tensors"]["layers.2.attn.qkv"]
    flip(folder / MODEL_FILE, qkv["scales_offset"] + 1)
    problems = verify(folder)
    assert problems == ["layer 1 expert 2: checksum mismatch in tensor layers.1.experts.2.down",
                        "layer 2: checksum mismatch in tensor layers.2.attn.qkv scales"]
