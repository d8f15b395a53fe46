"""Bad input: one clear MoeError (exit 2) naming the culprit, and nothing left behind that looks like a model."""

import json
import shutil

import pytest
from moe.convert import arch, convert
from moe.convert import converter as converter_module
from moe.runtime.errors import MoeError
from tiny import make_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_checkpoint("mixtral", tmp_path_factory.mktemp("good"), shards=2)


@pytest.fixture
def src(good, tmp_path):
    """A fresh copy of a good two-shard checkpoint to break."""
    return shutil.copytree(good, tmp_path / "src")


def fails(src, out, match, exit_code=2, **kw):
    with pytest.raises(MoeError, match=match) as info:
        convert(src, out, **kw)
    assert info.value.exit_code == exit_code
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary folder
    return str(info.value)


def test_missing_source(tmp_path):
    fails(str(tmp_path / "nowhere"), tmp_path / "out", "no such folder, and not a Hub id")


def test_truncated_shard(src, tmp_path):
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    message = fails(src, tmp_path / "out", "truncated")
    assert "model-00002-of-00002.safetensors" in message and "tensor" in message


def test_absurd_header_length(src, tmp_path):
    shard = src / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**15).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    assert "model-00001-of-00002.safetensors: not a valid safetensors file (header length" in fails(
        src, tmp_path / "out", "header length")


def test_header_that_is_not_json(src, tmp_path):
    shard = src / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(data))
    fails(src, tmp_path / "out", "header is not valid JSON")


def test_overlapping_tensors(src, tmp_path):
    shard = src / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"][:]
    size = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
    header[second]["shape"] = [size // 2]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    shard.write_bytes(data[:8] + blob + data[8 + n:])
    fails(src, tmp_path / "out", "overlap")


def test_no_config(src, tmp_path):
    (src / "config.json").unlink()
    fails(src, tmp_path / "out", "config.json: missing")


def test_unknown_architecture(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(config))
    message = fails(src, tmp_path / "out", "unsupported architecture")
    assert "GPT2LMHeadModel" in message and all(a in message for a in arch.KNOWN)


@pytest.mark.parametrize("bits, group_size, match", [(5, 32, "--bits 5"), (4, 48, "--group-size 48"),
                                                     (4, 0, "--group-size 0")])
def test_bad_options(src, tmp_path, bits, group_size, match):
    fails(src, tmp_path / "out", match, bits=bits, group_size=group_size)


def test_existing_output_needs_force(src, tmp_path):
    out = convert(src, tmp_path / "out")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(MoeError, match="already exists; pass --force"):
        convert(src, out)
    assert (out / "manifest.json").read_bytes() == before
    convert(src, out, bits=8, force=True)
    assert json.loads((out / "manifest.json").read_text())["quantization"]["bits"] == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_never_replaces_a_folder_that_is_not_a_model(src, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(MoeError, match="not a converted model; refusing"):
        convert(src, precious, force=True)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_pickle_only_folder(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    fails(folder, tmp_path / "out", "only pickle weights \\(pytorch_model.bin\\)")


def test_config_that_does_not_match_the_weights(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path / "out", "config.json implies \\[96, 64\\] for layers.0.experts.0.gate_up")


def test_unexpected_tensor(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path / "out", "tensor model.layers.1.* and .* more not expected for a mixtral model")


def test_missing_tensor(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path / "out", "tensor model.layers.2.self_attn.q_proj.weight is missing")


def test_missing_tokenizer(src, tmp_path):
    (src / "tokenizer.json").unlink()
    fails(src, tmp_path / "out", "no tokenizer.json")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143), OSError(28, "No space left on device")])
def test_interrupted_conversion_leaves_nothing(src, tmp_path, monkeypatch, interrupt):
    calls = []

    def failing_quantize(*args):
        calls.append(1)
        if len(calls) == 5:
            raise interrupt
        return real(*args)

    real = converter_module.quantize
    monkeypatch.setattr(converter_module, "quantize", failing_quantize)
    out = tmp_path / "out"
    expected = MoeError if isinstance(interrupt, OSError) else type(interrupt)
    with pytest.raises(expected) as info:
        convert(src, out)
    if isinstance(interrupt, OSError):
        assert "no space left" in str(info.value) and info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == [src]


def test_malformed_config_values(src, tmp_path):
    config = json.loads((src / "config.json").read_text())
    config["hidden_size"] = "wide"
    (src / "config.json").write_text(json.dumps(config))
    fails(src, tmp_path / "out", "config.json: malformed \\(ValueError")


def test_unwritable_output(src, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(MoeError, match="cannot write the converted model") as info:
        convert(src, blocker / "out")
    assert info.value.exit_code == 1 and "\n" not in str(info.value)
