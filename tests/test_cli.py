"""The CLI in-process over a scripted stand-in model: stdout holds only the product, errors are one line."""

import io
import json
import signal
import time

import moe.cli.bench
import moe.cli.run
import moe.cli.trace
import moe.runtime.bench
import moe.runtime.kernels
import moe.runtime.model
import numpy as np
import pytest
from fakes import ScriptedModel
from moe.cli import main
from moe.cli.errors import Terminated
from moe.runtime.errors import MoeError
from moe.runtime.sampling import Sampler

SCRIPT = "    return a + b\n\nprint(add(1, 2))  # ✓ 😀\n"


@pytest.fixture
def opened(monkeypatch):
    """Replace model loading; returns the list of (spec, budget, threads, model) it was asked for."""
    calls = []

    def fake_open(spec, memory_budget=None, threads=None, pin=None, kv_cache="auto"):
        model = ScriptedModel(SCRIPT)
        model.kv_cache = kv_cache
        calls.append((spec, memory_budget, threads, model))
        return model, 0.01

    monkeypatch.setattr(moe.cli.run, "open_model", fake_open)
    return calls


def moe_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_streams_only_the_text(capsys, opened):
    code, out, err = moe_cli(capsys, "run", "def add(a, b):\n", "--max-tokens", "100")
    assert (code, out, err) == (0, SCRIPT, "")
    assert opened[0][:3] == (None, None, None)  # one positional argument: the prompt, on the demo model


def test_model_and_prompt(capsys, opened):
    code, out, _ = moe_cli(capsys, "run", "some-model", "x", "--memory-budget", "1.5GiB", "-t", "2")
    assert code == 0 and out == SCRIPT
    assert opened[0][:3] == ("some-model", 3 * 2**29, 2) and opened[0][3].kv_cache == "auto"
    code, out, _ = moe_cli(capsys, "run", "some-model", "x", "--kv-cache", "q8")
    assert code == 0 and out == SCRIPT and opened[1][3].kv_cache == "q8"


def test_prompt_from_stdin(capsys, opened, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\n"))
    code, out, _ = moe_cli(capsys, "run", "-", "--max-tokens", "100", "--temperature", "0")
    model = opened[0][3]
    assert code == 0 and out == SCRIPT
    assert model.prompt_len == len(model.tokenizer.encode("def add(a, b):\n"))


def test_empty_stdin_is_bad_input(capsys, opened, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, out, err = moe_cli(capsys, "run", "-")
    assert code == 2 and out == "" and err == "error: stdin held no prompt; pipe some text in\n"


def test_json(capsys, opened):
    code, out, err = moe_cli(capsys, "run", "x", "--json", "--stop", "\\n\\n")
    result = json.loads(out)
    assert code == 0 and err == ""
    assert result["text"] == "    return a + b" and result["finish_reason"] == "stop"
    assert result["generated_tokens"] > 0 and result["prompt_tokens"] == 1
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_bytes", "model_stats"):
        assert key in result


def test_stats_go_to_stderr(capsys, opened):
    code, out, err = moe_cli(capsys, "run", "x", "--stats")
    assert code == 0 and out == SCRIPT
    assert "tok/s" in err and "expert cache hit rate 75.0%" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["run", "x", "--max-tokens", "-1"], "--max-tokens"),
    (["run", "x", "--memory-budget", "lots"], "'lots' is not a size"),
    (["run", "x", "--top-p", "0"], "--top-p"),
    (["run", "x", "--temperature", "-0.5"], "--temperature"),
    (["run", "x", "--system", "be brief"], "--chat"),
    (["run", "x", "--chat"], "no chat template"),
    (["run"], "PROMPT"),
    (["run", "x", "--frobnicate"], "--frobnicate"),
    (["nonsense"], "nonsense"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, opened, args, message):
    code, out, err = moe_cli(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def failing(monkeypatch):
    def set_failure(exc):
        def fake_open(spec, memory_budget=None, threads=None, pin=None, kv_cache="auto"):
            raise exc

        monkeypatch.setattr(moe.cli.run, "open_model", fake_open)

    return set_failure


def test_runtime_error_exit_1(capsys, failing):
    failing(MoeError("experts.bin: read failed; check the disk", 1))
    assert moe_cli(capsys, "run", "x") == (1, "", "error: experts.bin: read failed; check the disk\n")


def test_unexpected_exception_hides_the_traceback_unless_asked(capsys, failing, monkeypatch):
    failing(ZeroDivisionError("division by zero"))
    code, out, err = moe_cli(capsys, "run", "x")
    assert code == 1 and out == ""
    assert err == "error: unexpected ZeroDivisionError: division by zero (set MOE_DEBUG=1 or --debug for the traceback)\n"
    code, _, err = moe_cli(capsys, "--debug", "run", "x")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err
    monkeypatch.setenv("MOE_DEBUG", "1")
    code, _, err = moe_cli(capsys, "run", "x")
    assert code == 1 and "Traceback" in err


class InterruptedModel(ScriptedModel):
    def __init__(self, after: int, exc: type[BaseException]):
        super().__init__(SCRIPT)
        self.after, self.exc = after, exc

    def forward(self, ids, last_only=False):
        if len(self.forwards) > self.after:
            raise self.exc()
        return super().forward(ids, last_only)


@pytest.mark.parametrize("exc, code, said", [(KeyboardInterrupt, 130, "interrupted"),
                                            (Terminated, 128 + signal.SIGTERM, "terminated")])
def test_interrupt_keeps_the_text_so_far(capsys, monkeypatch, exc, code, said):
    model = InterruptedModel(after=5, exc=exc)
    monkeypatch.setattr(moe.cli.run, "open_model", lambda *a: (model, 0.0))
    got, out, err = moe_cli(capsys, "run", "x")
    assert got == code and err == said + "\n"
    assert out == model.tokenizer.decode(model.script[:6])  # the prefill and 5 decode steps gave 6 tokens


def test_interrupt_gives_out_text_held_for_a_stop_string(capsys, monkeypatch):
    """Text held back because it might begin a stop string is printed when Ctrl-C comes before it resolves."""
    model = InterruptedModel(after=5, exc=KeyboardInterrupt)
    monkeypatch.setattr(moe.cli.run, "open_model", lambda *a: (model, 0.0))
    said = model.tokenizer.decode(model.script[:6])
    code, out, _ = moe_cli(capsys, "run", "x", "--stop", said + "never")
    assert code == 130 and out == said


def test_interrupt_with_json_still_reports(capsys, monkeypatch):
    model = InterruptedModel(after=3, exc=KeyboardInterrupt)
    monkeypatch.setattr(moe.cli.run, "open_model", lambda *a: (model, 0.0))
    code, out, _ = moe_cli(capsys, "run", "x", "--json")
    result = json.loads(out)
    assert code == 130 and result["finish_reason"] == "interrupted" and result["generated_tokens"] == 4


def test_sigterm_raises_terminated_while_a_command_runs(capsys, monkeypatch):
    class SelfTerminating(ScriptedModel):
        def forward(self, ids, last_only=False):
            if len(self.forwards) == 2:
                signal.raise_signal(signal.SIGTERM)
            return super().forward(ids, last_only)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(moe.cli.run, "open_model", lambda *a: (SelfTerminating(SCRIPT), 0.0))
    code, out, err = moe_cli(capsys, "run", "x")
    assert code == 143 and err == "terminated\n" and out
    assert signal.getsignal(signal.SIGTERM) is before


def bench_with(monkeypatch, load) -> None:
    """`moe bench` on the model `load` returns, its kernels taken as compiled, the demo's name resolved, and a
    context of 512 (ScriptedModel's)."""
    monkeypatch.setattr(moe.runtime.model, "load_model", load)
    monkeypatch.setattr(moe.runtime.kernels, "cache_is_cold", lambda: False)
    monkeypatch.setattr(moe.cli.bench, "model_path", lambda spec: spec or "demo")
    monkeypatch.setattr(moe.runtime.bench, "context_limit", lambda path: 512)
    monkeypatch.setattr(moe.runtime.bench, "bytes_per_token", lambda layout: 10**6)


def test_bench_json(capsys, monkeypatch):
    loaded = []

    def fake_load(path, memory_budget=None, threads=None, max_context=None, pin=(), kv_cache="auto"):
        loaded.append((path, memory_budget, threads, max_context, kv_cache))
        return ScriptedModel("word " * 200, eos=False)

    bench_with(monkeypatch, fake_load)
    code, out, err = moe_cli(capsys, "bench", "--json", "--prompt-tokens", "16", "--gen-tokens", "8", "--repeat", "2",
                             "--memory-budget", "1MB", "--kv-cache", "q8")
    result = json.loads(out)
    assert code == 0 and err == ""
    assert loaded == [("demo", 10**6, None, 24, "q8")]  # the KV cache sized for the prompt and the tokens decoded
    assert result["kv_cache"] == "bf16"  # what the loaded model says it holds
    for key in ("load_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes", "expert_cache_hit_rate",
                "expert_bytes_read_per_token", "disk_bytes_read_per_token", "compile_s", "warmup_s"):
        assert key in result
    assert result["expert_cache_hit_rate"] == 0.75 and result["expert_bytes_read_per_token"] == 1000
    assert result["peak_rss_bytes"] > 10**6 and result["decode_tok_s"] > 0
    assert result["bytes_per_token"] == 10**6
    assert result["decode_gb_s"] == pytest.approx(10**6 * result["decode_tok_s"] / 1e9, abs=2e-3)
    code, out, _ = moe_cli(capsys, "bench", "--prompt-tokens", "600", "--gen-tokens", "8")
    assert code == 2 and out == ""
    code, out, err = moe_cli(capsys, "bench", "--kv-cache", "q4")
    assert code == 2 and out == "" and "--kv-cache" in err


@pytest.mark.parametrize("stream", ["random", "greedy"])
def test_bench_stream_feeds_decode_random_ids_or_its_own_argmax(capsys, monkeypatch, stream):
    class Recording(ScriptedModel):
        def __init__(self):
            super().__init__("word " * 200, eos=False)
            self.fed, self.argmax = [], []

        def forward(self, ids, last_only=False):
            if np.size(ids) == 1:
                self.fed.append(int(np.asarray(ids)[0]))
            logits = super().forward(ids, last_only)
            self.argmax.append(int(np.argmax(logits[-1])))
            return logits

    model = Recording()
    bench_with(monkeypatch, lambda *a, **k: model)
    code, out, _ = moe_cli(capsys, "bench", "--json", "--prompt-tokens", "8", "--gen-tokens", "6", "--repeat", "1",
                           "--stream", stream)
    assert code == 0 and json.loads(out)["stream"] == stream
    decoded = model.fed[-6:]  # the timed run's decode steps (the warm-up fed one token before them)
    previous = model.argmax[-7:-1]  # each step's input follows the logits of the call before it
    if stream == "greedy":
        assert decoded == previous
    else:
        assert sum(a != b for a, b in zip(decoded, previous, strict=True)) >= 5 and len(set(decoded)) == 6


def test_bench_depth_fills_context_before_the_timed_prompt(capsys, monkeypatch):
    loaded, calls = [], []

    class Recording(ScriptedModel):
        def forward(self, ids, last_only=False):
            calls.append(np.size(ids))
            return super().forward(ids, last_only)

        def reset(self, pos=0):
            calls.append("reset")
            return super().reset(pos)

    def fake_load(path, memory_budget=None, threads=None, max_context=None, pin=(), kv_cache="auto"):
        loaded.append(max_context)
        return Recording("word " * 200, eos=False)

    bench_with(monkeypatch, fake_load)
    code, out, _ = moe_cli(capsys, "bench", "--json", "--depth", "100", "--prompt-tokens", "8", "--gen-tokens", "3",
                           "--repeat", "2")
    assert code == 0 and json.loads(out)["depth"] == 100 and loaded == [111]
    timed = calls[calls.index("reset", 1):]  # after the warm-up
    assert timed == ["reset", 100, 8, 1, 1, 1] * 2  # the context, then the prompt, then decode, each run
    code, out, err = moe_cli(capsys, "bench", "--depth", "500", "--prompt-tokens", "8", "--gen-tokens", "8")
    assert code == 2 and out == "" and "--depth + --prompt-tokens + --gen-tokens = 516" in err


def test_bench_table(capsys, monkeypatch):
    bench_with(monkeypatch, lambda *a, **k: ScriptedModel("word " * 200, eos=False))
    code, out, err = moe_cli(capsys, "bench", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1")
    assert code == 0 and "decode" in out and "tok/s" in out and err == ""


@pytest.mark.parametrize("command", ["convert", "run", "bench", "perplexity", "info", "list", "verify"])
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = moe_cli(capsys, command, "--help")
    assert code == 0 and "Example" in out and f"moe {command}" in out


def test_version_and_bare_moe(capsys):
    code, out, _ = moe_cli(capsys, "--version")
    assert code == 0 and out.startswith("moe ")
    code, out, _ = moe_cli(capsys)
    assert code == 0 and "Commands" in out


# ---- text that is not UTF-8, endless, or a folder taken for a prompt

NOT_UTF8 = "caf\udce9 au lait"  # argv's b"caf\xe9 au lait" as Python hands it over (surrogateescape)


@pytest.mark.parametrize("args, name", [
    (["run", NOT_UTF8], "PROMPT"),
    (["run", "m", NOT_UTF8], "PROMPT"),
    (["run", "x", "--chat", "--system", NOT_UTF8], "--system"),
    (["run", "x", "--stop", NOT_UTF8], "--stop"),
    (["trace", "m", NOT_UTF8], "PROMPT"),
])
def test_arguments_that_are_not_utf8_are_one_line(capsys, opened, monkeypatch, args, name):
    monkeypatch.setattr(moe.cli.trace, "open_model", opened_never)
    code, out, err = moe_cli(capsys, *args)
    assert (code, out) == (2, "") and opened == []
    assert err == f"error: {name}: not UTF-8 text (byte 3); convert it to UTF-8\n"


def opened_never(*args, **kwargs):
    raise AssertionError("the model was opened before the arguments were checked")


@pytest.mark.parametrize("data, said", [
    (b"def f():\n    return 'caf\xe9'\n", "stdin: not UTF-8 text (byte 24); convert it to UTF-8"),
    (None, "stdin: larger than 64.00 MB; give a shorter text"),
])
def test_stdin_that_is_not_utf8_or_endless_is_one_line(capsys, opened, monkeypatch, data, said):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)) if data else open("/dev/zero"))
    start = time.perf_counter()
    code, out, err = moe_cli(capsys, "run", "-")
    assert (code, out) == (2, "") and err.startswith(f"error: {said}") and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("command", ["perplexity", "profile"])
def test_a_text_file_from_dev_zero_is_refused_unread(capsys, command):
    code, out, err = moe_cli(capsys, command, "m", "/dev/zero")
    assert (code, out) == (2, "") and err.startswith("error: /dev/zero: larger than 64.00 MB;")


def test_a_negative_seed_is_bad_input(capsys, opened):
    code, out, err = moe_cli(capsys, "run", "x", "--seed", "-1", "--temperature", "1")
    assert (code, out) == (2, "") and err.startswith("error: Invalid value for '--seed'") and len(err.splitlines()) == 1
    with pytest.raises(MoeError, match="--seed -1 must be 0 or more"):  # the Python API says the same
        Sampler(1.0, 0, 1.0, 0.0, -1)


def test_one_argument_naming_a_folder_or_a_model_is_not_taken_for_a_prompt(capsys, opened, monkeypatch, tmp_path):
    from moe.runtime.home import models_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "good").mkdir()
    (models_dir() / "org--model").mkdir(parents=True)
    for name in ("good", "./good/", "org/model", "org--model"):
        code, out, err = moe_cli(capsys, "run", name)
        assert (code, out) == (2, "") and opened == []
        assert err == (f"error: {name} is a folder or a converted model, and no prompt follows: give both "
                       f"(moe run {name} \"PROMPT\"), or to run the demo on the text {name!r}, pipe it in "
                       f"(echo {name} | moe run -)\n")
    assert moe_cli(capsys, "run", "goodness")[:2] == (0, SCRIPT)  # a prompt that only looks like one
