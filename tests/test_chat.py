"""`moe chat` driven through a pseudo-terminal, as a person types into it, on the demo with a chat template."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pexpect
import pytest
from moe.convert import convert
from moe.convert.demo import DEMO_SOURCE
from moe.runtime.generate import chat_ids, generate_ids
from moe.runtime.model import load_model
from test_serve import with_template

FIRST = "How do I sort a list?"
SECOND = "And a dict?"
STATS = re.compile(r"prompt (\d+) tokens \((\d+) from the cache\) \| (\d+) tokens")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return with_template(convert(DEMO_SOURCE, tmp_path_factory.mktemp("chat") / "demo-chat"))


def start(folder, tmp_path, *options) -> pexpect.spawn:
    env = {**os.environ, "MOE_HOME": str(tmp_path / "home"), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "moe", "chat", str(folder), *options], env=env, encoding="utf-8",
                          codec_errors="replace", timeout=120, dimensions=(50, 400))
    child.expect("chatting with demo-chat")
    child.expect(">>> ")
    return child


def turn(child: pexpect.spawn, line: str) -> tuple[str, tuple[int, ...]]:
    """Send one line; the answer as printed and the (prompt, cached, generated) token counts of --stats."""
    child.sendline(line)
    child.expect(STATS)
    counts = tuple(map(int, child.match.groups()))
    answer = child.before.replace("\r\n", "\n").removeprefix(line + "\n").removesuffix("\n")
    child.expect(">>> ")
    return answer, counts


def test_two_turns_the_second_remembers_the_first_and_runs_only_its_new_tokens(folder, tmp_path):
    child = start(folder, tmp_path, "--stats", "--max-tokens", "16", "--system", "You write Python.")
    first, (prompt1, cached1, made1) = turn(child, FIRST)
    second, (prompt2, cached2, made2) = turn(child, SECOND)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    model = load_model(folder)  # a fresh one: the second turn's whole prompt from an empty KV cache
    history = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": FIRST}]
    assert prompt1 == len(chat_ids(model.tokenizer, history)) and cached1 == 0
    assert first == "".join(generate_ids(model, chat_ids(model.tokenizer, history), max_tokens=16))
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    ids = chat_ids(model.tokenizer, history)
    model.reset()
    assert prompt2 == len(ids) and second == "".join(generate_ids(model, ids, max_tokens=16)) and made2 > 0
    # the first turn's prompt and answer came from the KV cache (all but the answer's last token when max-tokens
    # ended it: that one was sampled, never run); only the second question and the template's markers were run
    assert cached2 >= prompt1 + made1 - 1


def test_ctrl_c_stops_an_answer_and_the_session_goes_on(folder, tmp_path):
    child = start(folder, tmp_path, "--stats", "--max-tokens", "2000", "--temperature", "1", "--seed", "3")
    child.sendline(FIRST)
    child.expect_exact(FIRST + "\r\n")  # the terminal's echo
    child.expect(r"\S", timeout=60)  # the answer has begun
    child.sendintr()
    child.expect(STATS)
    assert child.match.group(3) != "2000" and "interrupted" in child.readline()
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect("forgotten")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(folder, tmp_path):
    child = start(folder, tmp_path)
    os.write(child.child_fd, b"def f(\xff):\n")
    child.expect(r"error: that line: not UTF-8 text \(byte 6\); convert it to UTF-8")
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_a_system_message_that_is_not_utf8_is_one_line(folder):
    done = subprocess.run([sys.executable, "-m", "moe", "chat", str(folder), "--system", os.fsdecode(b"be \xff")],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and done.stderr == "error: --system: not UTF-8 text (byte 3); convert it to UTF-8\n"
