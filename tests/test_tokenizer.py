"""Tokenizer: BOS rule, streaming decode over multi-byte UTF-8, chat templates in the sandbox, bad files."""

import shutil
from pathlib import Path

import pytest
from fakes import DEMO, DEMO_FACTS
from hypothesis import given, settings
from hypothesis import strategies as st
from moe.runtime.errors import MoeError
from moe.runtime.tokenizer import Tokenizer, render_chat_template
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

MULTIBYTE = "def f(x):\n    return '日本語のテキスト 😀 naïve café' + x  # 🎉🇫🇷 Ω≈ç√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n"
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def demo() -> Tokenizer:
    return Tokenizer.from_folder(DEMO, DEMO_FACTS)


def streamed(tok: Tokenizer, ids: list[int], prompt_ids=()) -> list[str]:
    stream = tok.stream(prompt_ids)
    return [stream.step(i) for i in ids]


def test_stream_equals_full_decode_over_emoji_and_cjk(demo):
    ids = demo.encode(MULTIBYTE)
    pieces = streamed(demo, ids)
    assert "".join(pieces) == demo.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(MULTIBYTE.encode()) / 4  # byte-level: most of these characters span several tokens
    assert "" in pieces  # some tokens end inside a character and wait for the next


def test_stream_after_a_prompt_continues_it(demo):
    ids = demo.encode(MULTIBYTE)
    cut = max(n for n in range(1, 16) if MULTIBYTE.startswith(demo.decode(ids[:n])))  # a character boundary
    pieces = streamed(demo, ids[cut:], prompt_ids=ids[:cut])
    assert demo.decode(ids[:cut]) + "".join(pieces) == MULTIBYTE


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_stream_never_splits_a_character(text):
    tok = Tokenizer.from_folder(DEMO, DEMO_FACTS)
    ids = tok.encode(text)
    pieces = streamed(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def metaspace_tokenizer(folder: Path) -> Path:
    """A sentencepiece-style tokenizer (Metaspace, byte fallback): its decoder drops the first leading space."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁hello", "▁world", "h", "w"]
    tok = HFTokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_byte_fallback_stream_and_bos(tmp_path):
    facts = {"tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}}
    tok = Tokenizer.from_folder(metaspace_tokenizer(tmp_path / "sp"), facts)
    ids = tok.encode("hello 😀 world")
    assert ids[0] == tok.bos_id == 1 and tok.add_bos
    assert tok.encode("hello", add_bos=False)[0] != 1
    assert tok.eos_ids == {2}
    prompt, rest = ids[:2], ids[2:]  # "<s> ▁hello"; then "▁", the emoji's four byte tokens, "▁world"
    pieces = streamed(tok, rest, prompt)
    assert pieces == [" ", "", "", "", "😀", " world"]
    assert tok.decode(prompt, skip_special_tokens=True) + "".join(pieces) == "hello 😀 world"


def test_no_bos_unless_the_config_asks(demo):
    assert not demo.add_bos and demo.bos_id == 0
    assert demo.encode("def f")[0] != 0
    assert demo.encode("def f", add_bos=True)[0] == 0
    assert demo.eos_ids == {1}


def test_facts_from_the_manifest():
    tok = Tokenizer.from_folder(DEMO, {"tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                     "chat_template": CHATML},
                                       "config": {"eos_token_ids": [1, 3]}})
    assert tok.encode("x")[0] == 0
    assert tok.eos_ids == {1, 3}
    assert tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]) == (
        "<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    bare = Tokenizer.from_folder(DEMO)
    assert bare.bos_id is None and not bare.eos_ids and bare.chat_template is None


def test_template_helpers():
    out = render_chat_template(
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{% for m in messages %}{% if loop.first %}{% continue %}"
        "{% endif %}{{ m.content }}{% endfor %}",
        [{"role": "user", "content": "café <b>"}, {"role": "user", "content": "second"}])
    assert out == '[{"role": "user", "content": "café <b>"}, {"role": "user", "content": "second"}]|4|second'


# Qwen2.5's template (tools, tool calls, tool responses): what the sandbox's bounds must leave working
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}}}}]
TURN = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "It is 18 C."}]


def test_a_hub_template_with_tools_renders():
    out = render_chat_template(QWEN25, [{"role": "system", "content": "Be brief."}, *TURN], tools=TOOLS,
                               add_generation_prompt=True)
    assert out == (
        '<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n{"type": "function", "function": {"name": "get_weather", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools><|im_end|>\n'
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18 C\n'
        '</tool_response><|im_end|>\n<|im_start|>assistant\nIt is 18 C.<|im_end|>\n<|im_start|>assistant\n')
    long = render_chat_template(QWEN25, TURN * 500, tools=TOOLS, add_generation_prompt=True)  # 2,000 messages
    assert long.count("<tool_response>") == 500


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ raise_exception.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}",
    "{{ messages[0].update({'content': 'pwned'}) }}",
])
def test_sandbox_refuses_python_internals(template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(MoeError, match="sandbox"):
        render_chat_template(template, messages)
    assert messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, message", [
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message is required') }}{% endif %}",
     "a system message is required"),
    ("{% for m in messages %}", "syntax error"),
    ("{% continue %}", "syntax error: 'continue' not properly in loop"),  # found by tests/bench/fuzz.py
    ("{{ nothing.here }}", "undefined"),
])
def test_template_errors_are_moe_errors(template, message):
    with pytest.raises(MoeError, match=message):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_no_template_is_a_clear_error(demo):
    with pytest.raises(MoeError, match="no chat template"):
        demo.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("content", ["{ not json", '{"model": {"type": "Nonsense"}}', "", "\xff\xfe"])
def test_malformed_tokenizer_json_names_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(MoeError) as info:
        Tokenizer.from_folder(tmp_path, DEMO_FACTS)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("facts", [
    {"tokenizer": {"bos_token": 0}}, {"tokenizer": {"chat_template": ["x"]}}, {"tokenizer": {"add_bos_token": "yes"}},
    {"tokenizer": "x"}, {"config": {"eos_token_ids": ["1"]}}, {"config": {"eos_token_ids": 1}}, {"config": "x"},
])
def test_malformed_manifest_facts_name_the_manifest(tmp_path, facts):
    shutil.copy(DEMO / "tokenizer.json", tmp_path)
    with pytest.raises(MoeError, match="manifest.json: malformed tokenizer facts"):
        Tokenizer.from_folder(tmp_path, facts)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(MoeError, match="tokenizer.json: missing"):
        Tokenizer.from_folder(tmp_path)
