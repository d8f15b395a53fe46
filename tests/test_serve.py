"""`moe serve` with the real `openai` client on a loopback port, and the prompt cache under it, on the demo model.

The server runs in this process (uvicorn in a thread, on a port the OS picks) over the demo converted
once for the module, with a chat template added to its manifest (the demo has none). `moe run` on the
same folder is the reference for greedy text.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from moe.cli import main
from moe.convert import convert
from moe.convert.demo import DEMO_SOURCE
from moe.runtime.generate import chat_ids, generate_ids
from moe.runtime.layout import MANIFEST
from moe.runtime.model import load_model
from moe.runtime.paging import min_budget, slot_bytes
from moe.runtime.server import MAX_BODY, Api
from test_faults import default_sigint

# the demo's special tokens as a chat template's markers: <s>role<unk>content</s>, as Llama 3's headers
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}<unk>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant<unk>{% endif %}")
PROMPT = "def fibonacci(n):\n"
SYSTEM = "You write Python."
QUESTION = "How do I sort a list?"


def with_template(folder, template: str = TEMPLATE):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["tokenizer"]["chat_template"] = template
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return with_template(convert(DEMO_SOURCE, tmp_path_factory.mktemp("serve") / "demo-chat"))


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def server(model, folder):
    """The base URL of `moe serve`'s app over `model`, on a free loopback port."""
    listener = socket.create_server(("127.0.0.1", 0))
    app = Api(model, folder.name).app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    listener.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def moe_run(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["run", *map(str, args)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("paged", [False, True], ids=["mapped", "paged"])
def test_a_cached_prefix_gives_the_logits_of_a_fresh_prefill_exactly(folder, paged):
    # Exact, not close: every kernel computes a token's row the same whatever else is in the call (activations
    # are quantized per row, attention runs per query, experts per routed row), so neither how a prompt is
    # split across forward calls nor decode (T = 1) against prefill can change a bit of it. Paged in 6 slots
    # for 32 experts, experts are evicted, predicted and prefetched between the calls: still the same bits.
    want_model = load_model(folder)
    budget = min_budget(want_model.layout) + 4 * slot_bytes(want_model.layout)
    model = load_model(folder, memory_budget=budget, prefetch=True) if paged else want_model
    assert model.experts.wants_prediction == paged
    ids = np.array(model.tokenizer.encode(PROMPT + "    if n < 2:\n        return n\n    return fib"), np.int64)
    want = want_model.logits(ids)
    for cut in (1, 7, len(ids) - 1):
        model.reset()
        model.forward(ids[:cut])
        assert model.cached_prefix(ids) == cut
        model.reset(model.cached_prefix(ids))
        np.testing.assert_array_equal(model.forward(ids[cut:]), want[cut:])
    model.reset()
    for token in ids[:-3]:  # the prefix run one token at a time, as a previous answer's tokens are
        model.forward(token[None], last_only=True)
    np.testing.assert_array_equal(model.forward(ids[-3:]), want[-3:])
    other = ids.copy()
    other[5] = (other[5] + 1) % model.config.vocab_size
    assert model.cached_prefix(other) == 5 and model.cached_prefix(ids[:4]) == 3  # one id always runs


def test_completion_whole_and_streamed_is_moe_runs_text(client, folder, model, capsys):
    want = moe_run(capsys, folder, PROMPT, "--max-tokens", "24")
    whole = client.completions.create(model=folder.name, prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens == len(model.tokenizer.encode(PROMPT))
    chunks = list(client.completions.create(model=folder.name, prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 24
    # the same prompt again: all of it but its last token came from the KV cache, and the text is the same
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1


def test_sampling_fields_are_moe_runs_options(client, folder, capsys):
    want = moe_run(capsys, folder, PROMPT, "--max-tokens", "40", "--temperature", "0.8", "--top-k", "40", "--top-p",
                   "0.9", "--min-p", "0.05", "--seed", "7", "--stop", "):")
    got = client.completions.create(model=folder.name, prompt=PROMPT, max_tokens=40, temperature=0.8, top_p=0.9,
                                    seed=7, stop=["):"], extra_body={"top_k": 40, "min_p": 0.05})
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"  # at "):", left out


def test_chat_whole_and_streamed_is_moe_run_chat(client, folder, capsys):
    want = moe_run(capsys, folder, QUESTION, "--chat", "--system", SYSTEM, "--max-tokens", "20")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=folder.name, messages=messages, max_tokens=20, temperature=0)
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=folder.name, messages=messages, max_completion_tokens=20,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    # the conversation goes on: its earlier turns come from the KV cache, and the answer is a fresh prompt's
    follow = [*messages, {"role": "assistant", "content": want}, {"role": "user", "content": "And a dict?"}]
    again = client.chat.completions.create(model=folder.name, messages=follow, max_tokens=12, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens
    fresh = load_model(folder)
    ids = chat_ids(fresh.tokenizer, follow)
    assert again.usage.prompt_tokens == len(ids)
    assert again.choices[0].message.content == "".join(generate_ids(fresh, ids, max_tokens=12))


CHAT = "/v1/chat/completions"
DONE = "/v1/completions"
HELLO = {"prompt": "def add(a, b):", "max_tokens": 2}
TALK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = [  # (method, path, body: dict or raw bytes, status, the param named)
    ("POST", DONE, b'{"prompt": "x",', 400, None),
    ("POST", DONE, b"\xff\xfe", 400, None),
    ("POST", DONE, b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("POST", DONE, b'["prompt"]', 400, None),
    ("POST", DONE, {"max_tokens": 2}, 400, "prompt"),
    ("POST", DONE, {"prompt": 7}, 400, "prompt"),
    ("POST", DONE, {"prompt": ""}, 400, "prompt"),
    ("POST", DONE, {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("POST", DONE, {"prompt": [5] * 2049}, 400, "prompt"),  # the demo's context is 2,048
    ("POST", DONE, {"prompt": "a = 1\n" * 3000}, 400, "prompt"),
    ("POST", DONE, {**HELLO, "temperature": "hot"}, 400, "temperature"),
    ("POST", DONE, {**HELLO, "temperature": -0.5}, 400, "temperature"),
    ("POST", DONE, {**HELLO, "top_p": 1.5}, 400, "top_p"),
    ("POST", DONE, {**HELLO, "top_p": 0}, 400, "top_p"),
    ("POST", DONE, {**HELLO, "top_k": -1}, 400, "top_k"),
    ("POST", DONE, {**HELLO, "min_p": 2}, 400, "min_p"),
    ("POST", DONE, {**HELLO, "max_tokens": -1}, 400, "max_tokens"),
    ("POST", DONE, {**HELLO, "max_tokens": 2.5}, 400, "max_tokens"),
    ("POST", DONE, {**HELLO, "max_tokens": True}, 400, "max_tokens"),
    ("POST", DONE, {**HELLO, "seed": -3}, 400, "seed"),
    ("POST", DONE, {**HELLO, "n": 2}, 400, "n"),
    ("POST", DONE, {**HELLO, "logprobs": 3}, 400, "logprobs"),
    ("POST", DONE, {**HELLO, "stop": 5}, 400, "stop"),
    ("POST", DONE, {**HELLO, "stop": ["x"] * 17}, 400, "stop"),
    ("POST", DONE, {**HELLO, "stream": "yes"}, 400, "stream"),
    ("POST", DONE, {**HELLO, "stream": True, "stream_options": []}, 400, "stream_options"),
    ("POST", DONE, {**HELLO, "model": 3}, 400, "model"),
    ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    ("POST", CHAT, {"messages": []}, 400, "messages"),
    ("POST", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0]"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0].content"),
    ("POST", CHAT, {**TALK, "temperature": -1}, 400, "temperature"),
    ("POST", CHAT, {**TALK, "tools": [{"type": "function"}]}, 400, "tools"),
    ("GET", "/v1/nothing", None, 404, None),
    ("POST", "/v1/embeddings", {"input": "x"}, 404, None),
    ("GET", DONE, None, 405, None),
    ("DELETE", "/health", None, 405, None),
    ("POST", DONE, b" " * (MAX_BODY + 1), 413, None),
]


@pytest.mark.parametrize("method, path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_their_status_in_openais_shape(server, method, path, body, status, param):
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    reply = httpx.request(method, server + path, content=content, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in reply.text
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_a_body_too_large_is_refused_before_it_is_read(server):
    def chunked():  # no Content-Length: the server counts the body as it comes
        yield b"{" * MAX_BODY
        yield b"{"

    reply = httpx.post(server + DONE, content=chunked(), timeout=30)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:  # declares 40 MiB and sends none of it
        conn.sendall(f"POST {DONE} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MAX_BODY}\r\n\r\n".encode())
        assert conn.recv(100).startswith(b"HTTP/1.1 413 ")


def test_models_and_health(client, folder, server):
    assert [m.id for m in client.models.list()] == [folder.name]
    assert httpx.get(server + "/health").json() == {"status": "ok", "model": folder.name, "queue": 0}


def test_eight_concurrent_clients_are_all_served_in_full(client, folder, server):
    prompts = [f"def task_{i}(items):\n" for i in range(8)]

    def ask(prompt, stream=False):
        if stream:
            chunks = client.completions.create(model=folder.name, prompt=prompt, max_tokens=12, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return client.completions.create(model=folder.name, prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts, [i % 2 == 0 for i in range(8)]))
    assert together == alone and all(alone)
    assert httpx.get(server + "/health").json()["queue"] == 0


def test_a_client_that_leaves_frees_the_model(client, folder, model, server):
    before = model.stats["tokens"]
    with httpx.stream("POST", server + DONE, json={"prompt": PROMPT, "max_tokens": 1500, "stream": True}) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")
    with pytest.raises(httpx.ReadTimeout):  # a whole response whose client gives up waiting
        httpx.post(server + DONE, json={"prompt": PROMPT, "max_tokens": 1500}, timeout=0.5)
    answer = client.completions.create(model=folder.name, prompt=PROMPT, max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3
    # 3,000 tokens were asked for and 3 got: the two that left were stopped within a few hundred
    assert model.stats["tokens"] - before < 600
    assert httpx.get(server + "/health").json()["queue"] == 0


def test_moe_serve_command_listens_on_loopback_and_stops_on_ctrl_c(folder, tmp_path):
    env = {**os.environ, "MOE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "moe", "serve", str(folder), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    try:
        # a first run on this machine says it compiles the kernels before it serves
        seen, found = [], None
        for line in iter(proc.stderr.readline, ""):
            seen.append(line)
            if found := re.search(r"serving demo-chat at (http://127\.0\.0\.1:(\d+)/v1)", line):
                break
        assert found, seen
        base = found.group(1)
        assert httpx.get(base.removesuffix("/v1") + "/health").json()["status"] == "ok"
        busy = subprocess.run([sys.executable, "-m", "moe", "serve", str(folder), "--port", found.group(2)],
                              capture_output=True, text=True, env=env, timeout=60)
        assert busy.returncode == 2 and busy.stderr.count("\n") == 1 and "in use" in busy.stderr
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out == "" and "Traceback" not in err
