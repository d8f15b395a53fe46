"""`python -m moe` as a user runs it, on the bundled demo model: exit codes, signals, stdout holding only text.

One moe home for the module (the demo converts once); Numba's cache is the test session's, so the
kernels compile at most once per session.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest
from test_faults import default_sigint

PROMPT = "def add(a, b):\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("moe-home")
    env = {**os.environ, "MOE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf")}
    env.pop("MOE_DEBUG", None)
    import moe.runtime.kernels  # noqa: F401  (sets NUMBA_CACHE_DIR for this process, which the children share)

    env["NUMBA_CACHE_DIR"] = os.environ["NUMBA_CACHE_DIR"]
    return env


def moe(env, *args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "moe", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_stdin_prompt_greedy_is_deterministic_and_stdout_is_only_text(env):
    first = moe(env, "run", "-", "--max-tokens", "20", "--temperature", "0", stdin=PROMPT)
    second = moe(env, "run", "-", "--max-tokens", "20", "--temperature", "0", stdin=PROMPT)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert "Traceback" not in first.stderr + second.stderr
    for noise in ("compiling", "converting", "error"):  # what moe says goes to stderr, never into the text
        assert noise not in first.stdout


def test_json_and_stats(env):
    done = moe(env, "run", "def fibonacci(n):", "--max-tokens", "8", "--json", "--stats", "--seed", "3",
               "--temperature", "0.8", "--top-p", "0.9")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["generated_tokens"] <= 8 and isinstance(result["text"], str)
    assert "tok/s" in done.stderr


def test_bad_usage_exits_2_with_one_line(env):
    done = moe(env, "run", "x", "--max-tokens", "-3")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "--max-tokens" in done.stderr


def test_missing_model_exits_2(env, tmp_path):
    done = moe(env, "run", str(tmp_path / "nowhere"), "hello")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and "nowhere" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_keeps_the_text_and_exits_cleanly(env, signum, code):
    # 1,500 sampled tokens are 5.5 kB of text: with a pipe of 4 kB the child waits for us to read, so it is still
    # generating when the signal comes (it can write 1,500 tokens faster than a busy machine lets us send it)
    proc = subprocess.Popen([sys.executable, "-m", "moe", "run", PROMPT, "--max-tokens", "1500", "--temperature",
                             "1.5", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=default_sigint)
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    first = b"".join(os.read(proc.stdout.fileno(), 1) for _ in range(12))  # unbuffered: the pipe stays full
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert len(first) == 12 and (first + rest).decode().strip()
    assert err.decode().splitlines()[-1] in ("interrupted", "terminated") and b"Traceback" not in err


def test_closed_stdout_pipe_is_quiet(env):
    proc = subprocess.Popen([sys.executable, "-m", "moe", "run", PROMPT, "--max-tokens", "200"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout.read(1)
    proc.stdout.close()  # like `moe run ... | head -c 1`
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err and b"error" not in err
