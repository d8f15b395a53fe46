"""Generation over a scripted stand-in model: EOS, max tokens, stop strings, context, chat, seeds."""

import pytest
from fakes import EOS, ScriptedModel
from moe.runtime.errors import MoeError
from moe.runtime.generate import _stop_prefix_len, generate, generate_tokens

SCRIPT = "    return a + b\n\nprint(add(1, 2))  # 3 ✓ 😀\n"


def test_greedy_text_is_the_script_then_eos():
    model = ScriptedModel(SCRIPT)
    gen = generate(model, "def add(a, b):\n")
    pieces = list(gen)
    assert "".join(pieces) == gen.text == SCRIPT
    assert not any("\ufffd" in p for p in pieces)
    assert gen.finish_reason == "stop"
    assert gen.tokens == model.script[:-1]
    assert model.forwards == [gen.prompt_tokens] + [1] * len(gen.tokens)  # prefill, then one token per step
    summary = gen.summary()
    assert summary["prompt_tokens"] == len(model.tokenizer.encode("def add(a, b):\n"))
    assert summary["generated_tokens"] == len(gen.tokens)
    assert summary["ttft_s"] > 0 and summary["decode_tok_s"] > 0


def test_generate_tokens_stops_before_eos_unless_told_otherwise():
    model = ScriptedModel("abc def")
    ids = model.tokenizer.encode("x")
    assert list(generate_tokens(model, ids, 100)) == model.script[:-1]
    more = list(generate_tokens(model, ids, 100, stop_ids=[]))
    assert more[: len(model.script)] == model.script and len(more) == 100


def test_max_tokens():
    model = ScriptedModel(SCRIPT)
    gen = generate(model, "x", max_tokens=3)
    list(gen)
    assert len(gen.tokens) == 3 and gen.text == model.tokenizer.decode(model.script[:3]) and gen.finish_reason == "length"
    model = ScriptedModel(SCRIPT)
    assert list(generate(model, "x", max_tokens=0)) == [] and model.forwards == []


@pytest.mark.parametrize("stop, expected", [
    (["\n\n"], "    return a + b"),
    (["a + b"], "    return "),
    (["print", "return"], "    "),
    (["    ret"], ""),
    (["zzz", "# 3"], "    return a + b\n\nprint(add(1, 2))  "),
    (["\n\nprint(add(1, 2))  # 3 ✓ 😀\n?"], SCRIPT),  # a prefix that never completes is released at the end
])
def test_stop_strings_are_never_printed(stop, expected):
    gen = generate(ScriptedModel(SCRIPT), "def add(a, b):\n", stop=stop)
    pieces = list(gen)
    assert "".join(pieces) == expected
    assert gen.finish_reason == "stop"
    for s in stop:
        assert s not in "".join(pieces)


def test_stop_prefix_hold_back():
    assert _stop_prefix_len("abc\n", ["\n\n"]) == 1
    assert _stop_prefix_len("abc", ["\n\n", "bcd", "c"]) == 2
    assert _stop_prefix_len("abc", ["x"]) == 0


def test_context_limits():
    model = ScriptedModel("word " * 50, max_context=20, eos=False)
    gen = generate(model, "x y z", max_tokens=100)
    list(gen)
    assert model.pos == 20 and gen.finish_reason == "length"
    with pytest.raises(MoeError, match="longer than the model's context of 20") as info:
        generate(model, "word " * 40)
    assert info.value.exit_code == 2
    with pytest.raises(MoeError, match="empty"):
        generate(model, "")
    with pytest.raises(MoeError, match="--max-tokens"):
        generate(model, "x", max_tokens=-1)


def test_seeded_sampling_is_repeatable():
    def sample(seed):
        return generate(ScriptedModel(SCRIPT, margin=1.0), "x", max_tokens=30, temperature=1.0, seed=seed)

    runs = ["".join(sample(seed)) for seed in (5, 5, 6)]
    assert runs[0] == runs[1] != runs[2]


def test_chat_uses_the_template():
    model = ScriptedModel("Hi!")
    model.tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    gen = generate(model, "hello", chat=True, system="be kind")
    assert "".join(gen) == "Hi!"
    assert gen.prompt_tokens == len(model.tokenizer.encode("[system] be kind\n[user] hello\n[assistant] "))
    with pytest.raises(MoeError, match="--chat"):
        generate(model, "hello", system="be kind")
    model.tokenizer.chat_template = None
    with pytest.raises(MoeError, match="no chat template"):
        generate(model, "hello", chat=True)


def test_eos_ids_come_from_the_tokenizer():
    model = ScriptedModel("a b c")
    assert EOS in model.tokenizer.eos_ids
    model.tokenizer.eos_ids = frozenset({model.script[1]})
    assert list(generate_tokens(model, [5], 10)) == model.script[:1]
