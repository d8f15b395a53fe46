"""Property-based tests: mutated safetensors files, config.json, manifests and tokenizer files go through the
parsers, which accept them or answer with a MoeError of one line: never another exception, never a hang.

Each property starts from valid files and mutates them: values nudged (off by one, by an alignment, doubled,
negated), replaced by hostile ones (huge, negative, NaN, wrong types, paths), keys deleted or added, bytes
flipped, files cut short. MOE_FUZZ_EXAMPLES sets the examples per property (tests/bench/fuzz.py runs
thousands); MOE_FUZZ_REPORT names a JSON file the outcomes per property are written to at the end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moe.convert import convert
from moe.convert import converter as converter_module
from moe.convert.demo import DEMO_SOURCE
from moe.convert.safetensors_io import READABLE, Checkpoint, SafetensorsFile
from moe.convert.tokenizer_facts import tokenizer_info
from moe.runtime.errors import MoeError
from moe.runtime.layout import EXPERTS_FILE, MANIFEST, MODEL_FILE, read_manifest, verify
from moe.runtime.model import load_model
from moe.runtime.tokenizer import Tokenizer, render_chat_template
from tiny import ARCHS, make_checkpoint

EXAMPLES = int(os.environ.get("MOE_FUZZ_EXAMPLES", "80"))
SECONDS = float(os.environ.get("MOE_FUZZ_SECONDS", "120"))  # one input taking longer than this is a hang
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OUTCOMES: dict[str, Counter] = {}


class Hang(BaseException):
    """An input kept a parser busy for SECONDS (a BaseException, so no `except Exception` swallows it)."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(prop: str, fn, *args, **kwargs) -> bool:
    """Run fn: True if it accepted the input, False if it refused it with a proper MoeError."""
    counts = OUTCOMES.setdefault(prop, Counter())
    with time_limit(SECONDS):
        try:
            fn(*args, **kwargs)
        except MoeError as exc:
            assert exc.message.strip() and "\n" not in exc.message and exc.exit_code in (1, 2), repr(exc.message)
            counts["refused"] += 1
            return False
    counts["accepted"] += 1
    return True


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("MOE_FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps({k: dict(v) for k, v in OUTCOMES.items()}, indent=1))


# ---- mutations of JSON documents

SPECIAL_INTS = [0, -1, 1, 2, 3, 7, 31, 32, 33, 64, 16384, 2**31, 2**32, 2**53, 2**63, 2**64, 10**30, -(2**63)]
SPECIAL_TEXT = ["", "../../escape", "/etc/passwd", "f32", "bf16", "f16", "q4", "q8", "BF16", "F32", "U8", "I64",
                "full", "sliding", "chunked", "default", "yarn", "llama3", "head", "l2", "none", "model.bin",
                "experts.bin", "silu", "gpt_oss", "mixtral", "{{ x }}", "\x00", "é😀"]
NASTY = st.one_of(
    st.integers(), st.sampled_from(SPECIAL_INTS), st.floats(), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(SPECIAL_TEXT),
    st.lists(st.one_of(st.integers(-3, 2**33), st.sampled_from(SPECIAL_TEXT)), max_size=4),
    st.dictionaries(st.sampled_from(SPECIAL_TEXT), st.integers(-2, 10**6), max_size=2),
)


def nudged(data, v):
    """A value near v: the mutations that slip past type checks."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return data.draw(st.sampled_from([v + 1, v - 1, -v, 2 * v, v // 2, v + 32, v - 32, v + 64, v - 64,
                                          v + 16384, v - 16384, 0, v * 2**32]))
    if isinstance(v, float):
        return data.draw(st.sampled_from([-v, 0.0, v * 1e30, v / 1e30, float("nan"), float("inf"), 1.0]))
    if isinstance(v, str):
        return data.draw(st.sampled_from(["", v + v, v[:-1], v.upper(), v + ".", "../" + v]))
    if isinstance(v, list):
        return v[:-1] if v and data.draw(st.booleans()) else v + v[-1:]
    return data.draw(NASTY)


def pick(data, doc, leaves=frozenset()):
    """A (container, key) inside doc by a random walk from its root; keys in `leaves` are not walked into."""
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return None
        key = keys[data.draw(st.integers(0, len(keys) - 1))]
        child = node[key]
        deeper = isinstance(child, (dict, list)) and child and key not in leaves
        if not deeper or data.draw(st.integers(0, 3)) == 0:
            return node, key
        node = child


def mutate(data, doc, new_keys=(), leaves=frozenset(), max_edits=3):
    """A deep copy of doc with 1..max_edits edits: nudge, replace, delete, or add a key (from new_keys)."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, max_edits))):
        spot = pick(data, doc, leaves)
        if spot is None:
            continue
        parent, key = spot
        op = data.draw(st.sampled_from(["nudge", "nudge", "replace", "delete", "add"]))
        if op == "nudge":
            parent[key] = nudged(data, parent[key])
        elif op == "replace":
            parent[key] = data.draw(NASTY)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from(list(new_keys) or SPECIAL_TEXT))] = data.draw(NASTY)
        else:
            parent.insert(key, data.draw(NASTY))
    return doc


def corrupt(data, raw: bytes) -> bytes:
    """raw with bytes flipped, cut short or spliced."""
    raw = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


def dumps(doc) -> str:
    return json.dumps(doc, allow_nan=True)  # NaN and Infinity: Python's json reads them back


def linked_copy(src: Path, dst: Path, skip=()) -> Path:
    """dst holding symlinks to every file of src but those in `skip`."""
    dst.mkdir()
    for p in src.iterdir():
        if p.name not in skip:
            (dst / p.name).symlink_to(p)
    return dst


# ---- safetensors headers


def safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    blob = dumps(header).encode()
    return (len(blob) if length is None else length).to_bytes(8, "little") + blob + data


def valid_header() -> tuple[dict, bytes]:
    """A small file's header and data: every readable dtype, a scalar, an empty tensor, an unreadable dtype."""
    tensors = [("a.weight", "BF16", [3, 4]), ("b.bias", "F32", [5]), ("c.blocks", "U8", [2, 2, 2]),
               ("d.norm", "F16", []), ("e.ids", "I64", [2]), ("f.empty", "F32", [0, 4])]
    size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        n = int(np.prod(shape)) * size[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, bytes(range(256)) * (offset // 256) + bytes(range(offset % 256))


def read_everything(path: Path) -> None:
    f = SafetensorsFile(path)
    try:
        for name, t in f.tensors.items():
            if t.dtype in READABLE:
                assert f.raw(name).nbytes == t.nbytes
                float(np.asarray(f.raw(name), dtype=np.float64).sum())  # touch every byte
                f.release(t.begin, t.end)
    finally:
        f.close()


@fuzz
@given(st.data())
def test_mutated_safetensors_headers(data):
    header, payload = valid_header()
    mode = data.draw(st.sampled_from(["header", "header", "length", "bytes", "data"]))
    length = None
    if mode == "header":
        header = mutate(data, header, new_keys=["x", "dtype", "shape", "data_offsets", "__metadata__"])
    elif mode == "length":
        true = len(dumps(header).encode())
        length = data.draw(st.one_of(st.sampled_from([0, 1, 7, true - 1, true + 1, 2**63 - 1]),
                                     st.integers(0, 2**64 - 1)))
    elif mode == "data":
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    raw = safetensors_bytes(header, payload, length)
    if mode == "bytes":
        raw = corrupt(data, raw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(raw)
        attempt("safetensors", read_everything, path)


@fuzz
@given(st.data())
def test_mutated_shard_index(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(DEMO_SOURCE, Path(tmp) / "src", skip={"model.safetensors.index.json"})
        index = json.loads((DEMO_SOURCE / "model.safetensors.index.json").read_text())
        mutated = mutate(data, index, new_keys=["weight_map", "metadata"], leaves={"metadata"})
        text = dumps(mutated)
        if data.draw(st.integers(0, 4)) == 0:
            text = corrupt(data, text.encode()).decode("utf-8", "replace")
        (folder / "model.safetensors.index.json").write_text(text)

        def open_all():
            with Checkpoint(folder) as ckpt:
                for name in ckpt.names():
                    ckpt.raw(name)

        attempt("shard index", open_all)


# ---- config.json


CONFIG_KEYS = ["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "intermediate_size", "num_local_experts", "num_experts", "num_experts_per_tok",
               "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step", "interleave_moe_layer_step",
               "moe_layers", "no_rope_layers", "no_rope_layer_interval", "layer_types", "attention_chunk_size",
               "sliding_window", "use_sliding_window", "rope_theta", "rope_scaling", "rope_parameters",
               "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings", "text_config", "architectures",
               "model_type", "quantization_config", "attention_bias", "clip_qkv", "intermediate_size_mlp",
               "swiglu_limit", "eos_token_id", "bos_token_id", "rope_type", "factor", "beta_fast",
               "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "attention_factor"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-src")
    return {arch: make_checkpoint(arch, root / arch) for arch in ARCHS}


class _Accepted(BaseException):
    """convert() got as far as writing: every check of the source passed."""


def _accept(*args, **kwargs):
    raise _Accepted


def convert_until_writing(folder: Path, out: Path) -> None:
    with mock.patch.object(converter_module, "write_layout", _accept):
        try:
            convert(folder, out)
        except _Accepted:
            pass


@fuzz
@given(st.data())
def test_mutated_config_json(checkpoints, data):
    arch = data.draw(st.sampled_from(ARCHS))
    config = json.loads((checkpoints[arch] / "config.json").read_text())
    mutated = mutate(data, config, new_keys=CONFIG_KEYS, max_edits=4)
    text = dumps(mutated)
    if data.draw(st.integers(0, 9)) == 0:
        text = corrupt(data, text.encode()).decode("utf-8", "replace")
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(checkpoints[arch], Path(tmp) / "src", skip={"config.json"})
        (folder / "config.json").write_text(text)
        attempt(f"config.json {arch}", convert_until_writing, folder, Path(tmp) / "out")


# ---- manifests


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory):
    """Layouts to mutate: Mixtral at 4 bits, gpt-oss (biases, sinks) at 8, Llama 4 (dense, shared, NoPE) at 16."""
    root = tmp_path_factory.mktemp("fuzz-layouts")
    layouts = [convert(checkpoints[arch], root / arch, bits=bits) for arch, bits in
               (("mixtral", 4), ("gpt_oss", 8), ("llama4", 16))]
    for folder in layouts:  # kernels compiled (or loaded from numba's cache) before any input is timed
        load_and_run(folder, paged=True)
    return layouts


MANIFEST_KEYS = ["format", "format_version", "config", "files", "tensors", "experts", "tokenizer", "offset",
                 "scales_offset", "shape", "encoding", "group_size", "file", "nbytes", "crc32", "layers", "rope",
                 "window", "attention", "qk_norm", "moe", "num_experts", "top_k", "head_dim", "hidden_size"]


def load_and_run(folder: Path, paged: bool) -> None:
    read_manifest(folder)
    model = load_model(folder, max_context=8, memory_budget=10**9 if paged else None)
    try:
        logits = model.logits(np.array([1, 2, 3], np.int64))
        assert logits.shape == (3, model.config.vocab_size)
        model.tokenizer.encode("def f(x):")
    finally:
        model.close()


def keep(folder: Path, source: Path, paged: bool) -> None:
    """With MOE_FUZZ_KEEP set, the input about to be tried is saved there: what a crash (not an exception) leaves."""
    where = os.environ.get("MOE_FUZZ_KEEP")
    if where:
        sizes = {name: (folder / name).stat().st_size for name in (MODEL_FILE, EXPERTS_FILE)}
        Path(where).write_text(json.dumps({"source": str(source), "paged": paged, "sizes": sizes,
                                           "manifest": (folder / MANIFEST).read_text()}))


@fuzz
@given(st.data())
def test_mutated_manifests(converted, data):
    source = converted[data.draw(st.integers(0, len(converted) - 1))]
    manifest = json.loads((source / MANIFEST).read_text())
    mutated = mutate(data, manifest, new_keys=MANIFEST_KEYS, max_edits=2)
    text = dumps(mutated)
    if data.draw(st.integers(0, 9)) == 0:
        text = corrupt(data, text.encode()).decode("utf-8", "replace")
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(source, Path(tmp) / "model", skip={MANIFEST, MODEL_FILE, EXPERTS_FILE})
        for name in (MODEL_FILE, EXPERTS_FILE):  # copies: a truncation must not reach the shared files
            shutil.copyfile(source / name, folder / name)
        if data.draw(st.integers(0, 9)) == 0:
            victim = folder / data.draw(st.sampled_from([MODEL_FILE, EXPERTS_FILE]))
            os.truncate(victim, data.draw(st.integers(0, victim.stat().st_size)))
        (folder / MANIFEST).write_text(text)
        paged = data.draw(st.booleans())
        keep(folder, source, paged)
        attempt("manifest", load_and_run, folder, paged)
        attempt("manifest (verify)", verify, folder)


# ---- tokenizer files and chat templates

TOKENIZER_KEYS = ["chat_template", "bos_token", "eos_token", "add_bos_token", "name", "template", "content",
                  "post_processor", "single", "SpecialToken", "id", "type", "processors", "added_tokens"]
HUGE = frozenset({"vocab", "merges"})  # tokenizer.json's model tables: walked past, not into


def tokenizer_round_trip(folder: Path) -> None:
    facts = tokenizer_info(folder)
    tok = Tokenizer.from_folder(folder, {"tokenizer": facts, "config": {"eos_token_ids": [1]}})
    ids = tok.encode("def add(a, b):\n    return a + b  # é😀")
    tok.decode(ids)
    stream = tok.stream(ids[:2])
    for i in ids[2:]:
        stream.step(i)
    if tok.chat_template:
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


# Llama 3 style: BOS comes from tokenizer.json's post-processor when tokenizer_config.json has no add_bos_token
LLAMA3_POST = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
              {"Sequence": {"id": "B", "type_id": 1}}],
     "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}]}
TEMPLATES = ["{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
             [{"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}, {"name": "tool_use"}]]


@fuzz
@given(st.data())
def test_mutated_tokenizer_files(data):
    target = data.draw(st.sampled_from(["tokenizer_config.json", "special_tokens_map.json", "post_processor",
                                        "tokenizer.json", "chat_template.jinja"]))
    config = json.loads((DEMO_SOURCE / "tokenizer_config.json").read_text())
    tokenizer = json.loads((DEMO_SOURCE / "tokenizer.json").read_text())
    special = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    template = None
    if target == "tokenizer_config.json":
        if data.draw(st.booleans()):
            config["chat_template"] = data.draw(st.sampled_from(TEMPLATES))
        config = mutate(data, config, new_keys=TOKENIZER_KEYS)
    elif target == "special_tokens_map.json":  # without the config's own, the map's tokens count
        config = {k: v for k, v in config.items() if not k.endswith("_token")}
        special = mutate(data, special, new_keys=TOKENIZER_KEYS)
    elif target == "post_processor":
        del config["add_bos_token"]
        tokenizer["post_processor"] = mutate(data, {"post_processor": LLAMA3_POST},
                                             new_keys=TOKENIZER_KEYS).get("post_processor")
    elif target == "tokenizer.json":
        tokenizer = mutate(data, tokenizer, new_keys=TOKENIZER_KEYS, leaves=HUGE)
    else:
        template = "".join(data.draw(st.lists(TEMPLATE_PIECES, min_size=1, max_size=12))).encode()
    files = {"tokenizer_config.json": dumps(config).encode(), "special_tokens_map.json": dumps(special).encode(),
             "tokenizer.json": dumps(tokenizer).encode()}
    if template is not None:
        files["chat_template.jinja"] = template
    name = "tokenizer.json" if target == "post_processor" else target
    if data.draw(st.integers(0, 9)) == 0:
        files[name] = corrupt(data, files[name])
    with tempfile.TemporaryDirectory() as tmp:
        folder = linked_copy(DEMO_SOURCE, Path(tmp) / "src", skip=set(files))
        for fname, raw in files.items():
            (folder / fname).write_bytes(raw)
        attempt(f"tokenizer ({target})", tokenizer_round_trip, folder)


TEMPLATE_PIECES = st.sampled_from([
    "{{ ", " }}", "{% ", " %}", "{# ", " #}", "for m in messages", "endfor", "if ", "else", "endif", "set x = ",
    "messages", "m", "x", "['content']", ".content", "[0]", "[-1]", "|length", "|tojson", "|map(attribute='role')",
    "|list", "|join(',')", "|attr('__class__')", ".__class__", "__globals__", "__init__", "cycler", "joiner",
    "namespace(a=1)", "raise_exception('no')", "strftime_now('%Y')", "range(", "10**9", "9**9**9", ")", "(",
    "'a' * 10**6", "loop.index", "bos_token", "eos_token", "add_generation_prompt", "+", "~", " and ", " not ",
    "1/0", "macro f()", "f()", "endmacro", "continue", "break", "include 'x'", "self", "lipsum", "dict(a=1)",
    "'%s' % x", "'{0}'.format(x)", "\n", "é😀", "{%- ", " -%}",
])


@fuzz
@given(st.lists(TEMPLATE_PIECES, min_size=1, max_size=16))
def test_random_chat_templates(pieces):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    attempt("chat template", render_chat_template, "".join(pieces), messages, add_generation_prompt=True,
            bos_token="<s>", eos_token="</s>")
    assert messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
