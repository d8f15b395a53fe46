"""Faults a user meets: signals and a full disk during `moe convert`, an existing output, damaged model files.

Every case runs the `moe` command (in this process, or in a subprocess where a signal, a resource limit
or a crash is involved) and asserts the exit code, the one line on stderr (never a traceback) and that
nothing partial is left.
Exit codes, as cli/errors.py defines them: 2 bad input (a manifest moe cannot read, an output that
exists), 1 runtime failure (a full disk, data on disk that is not what was written: checksums and
sizes), 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moe.cli import main
from moe.convert import convert
from moe.convert.demo import DEMO_SOURCE
from moe.convert.synthetic import write_synthetic_checkpoint
from moe.runtime.layout import EXPERTS_FILE, FORMAT_VERSION, MANIFEST, MODEL_FILE, open_layout
from moe.runtime.paging import min_budget

# ~70 MB of bf16: a second or more to convert, so a signal lands mid-way
BIG = dict(num_hidden_layers=2, hidden_size=512, num_experts=16, intermediate_size=512, num_experts_per_tok=2,
           vocab_size=4096, num_attention_heads=8, num_key_value_heads=8)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("big"), BIG)


@pytest.fixture(scope="module")
def demo_q4(tmp_path_factory):
    """The bundled demo checkpoint converted at 4 bits, once for the module."""
    return convert(DEMO_SOURCE, tmp_path_factory.mktemp("demo") / "demo-q4")


@pytest.fixture
def env(isolated_home):
    import moe.runtime.kernels  # noqa: F401  (sets NUMBA_CACHE_DIR, which the children share)

    env = {**os.environ, "MOE_HOME": str(isolated_home / "moe"), "HF_HUB_OFFLINE": "1"}
    env.pop("MOE_DEBUG", None)
    return env


def one_line_error(err: str, *fragments: str) -> None:
    """stderr ends with one error line holding every fragment; before it at most notices (compiling kernels)."""
    lines = err.splitlines()
    assert err.endswith("\n") and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert [line for line in lines[:-1] if not line.startswith("compiling kernels")] == [], err
    for f in fragments:
        assert f in lines[-1], err


def leftovers(parent: Path, name: str) -> list[str]:
    """The output folder and any temporary folder of a conversion into parent/name."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell may start background jobs with SIGINT ignored


def wait_for_partial(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The temporary folder of the conversion, once its experts.bin is being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in parent.glob(f".{name}.partial-*"):
            experts = tmp / EXPERTS_FILE
            if experts.is_file() and experts.stat().st_size > 0:
                return tmp
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the conversion never started writing")


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_signal_during_convert_removes_the_temporary_folder(big, tmp_path, env, signum, code, said):
    proc = subprocess.Popen([sys.executable, "-m", "moe", "convert", str(big), "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, preexec_fn=default_sigint)
    partial = wait_for_partial(tmp_path, "out", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()
    assert out == b"" and err.decode() == said + "\n"
    assert not partial.exists() and leftovers(tmp_path, "out") == []


def test_full_disk_is_one_line_and_leaves_no_partial_model(big, tmp_path, env):
    """RLIMIT_FSIZE stands in for a full disk: a write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    limit = 4 << 20

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "moe", "convert", str(big), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, preexec_fn=small_disk, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    one_line_error(done.stderr, f"{tmp_path}: no space left for the converted model", "free some space")
    assert leftovers(tmp_path, "out") == []


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_existing_output_is_never_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["convert", str(DEMO_SOURCE), "-o", str(out), "--bits", "8"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main(["convert", str(DEMO_SOURCE), "-o", str(out)]) == 2
    got, err = capsys.readouterr()
    assert got == ""
    one_line_error(err, f"{out}: already exists; pass --force")
    assert snapshot(out) == before and leftovers(tmp_path, "model") == ["model"]
    assert main(["convert", str(DEMO_SOURCE), "-o", str(out), "--force"]) == 0
    assert json.loads((out / MANIFEST).read_text())["quantization"]["bits"] == 4
    assert leftovers(tmp_path, "model") == ["model"]


@pytest.mark.parametrize("kind", ["file", "folder", "symlink"])
def test_force_never_replaces_what_is_not_a_model(tmp_path, capsys, kind):
    target, notes = tmp_path / "precious", tmp_path / "elsewhere" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("years of work")
    if kind == "file":
        target.write_text("notes")
    elif kind == "folder":
        shutil.copytree(notes.parent, target)
        notes = target / "notes.txt"
    else:  # a link to someone's folder is never written through
        target.symlink_to(notes.parent)
    assert main(["convert", str(DEMO_SOURCE), "-o", str(target), "--force"]) == 2
    one_line_error(capsys.readouterr().err, "refusing to replace it even with --force")
    assert notes.read_text() == "years of work" and [p.name for p in notes.parent.iterdir()] == ["notes.txt"]
    assert leftovers(tmp_path, "precious") == ["precious"]


# ---- integrity


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture
def damaged_copy(demo_q4, tmp_path):
    return shutil.copytree(demo_q4, tmp_path / "model")


def test_verify_names_layer_expert_and_tensor(damaged_copy, capsys):
    m = json.loads((damaged_copy / MANIFEST).read_text())
    down = m["tensors"]["layers.1.experts.3.down"]
    flip_byte(damaged_copy / EXPERTS_FILE, down["scales_offset"] + 3)
    code = main(["verify", str(damaged_copy)])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == f"{damaged_copy}: layer 1 expert 3: checksum mismatch in tensor layers.1.experts.3.down scales\n"
    one_line_error(err, "1 checksum mismatch(es); reconvert the model")


def test_verify_intact_model(demo_q4, capsys):
    assert main(["verify", str(demo_q4)]) == 0
    assert capsys.readouterr() == (f"{demo_q4}: ok\n", "")


@pytest.mark.parametrize("command", [["verify"], ["run", "x"], ["info"]])
@pytest.mark.parametrize("damage", ["truncated", "longer"])
def test_truncated_model_bin_is_found_at_load(damaged_copy, capsys, command, damage):
    data = (damaged_copy / MODEL_FILE).read_bytes()
    (damaged_copy / MODEL_FILE).write_bytes(data[:-4096] if damage == "truncated" else data + b"\0")
    code = main([command[0], str(damaged_copy), *command[1:]])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    one_line_error(err, f"{damaged_copy / MODEL_FILE}: {len(data) + (-4096 if damage == 'truncated' else 1)} bytes, "
                        f"the manifest says {len(data)}")


def test_missing_experts_bin(damaged_copy, capsys):
    (damaged_copy / EXPERTS_FILE).unlink()
    assert main(["run", str(damaged_copy), "x"]) == 1
    one_line_error(capsys.readouterr().err, f"{damaged_copy / EXPERTS_FILE}: missing; reconvert the model")


def test_newer_format_asks_for_an_upgrade(damaged_copy, capsys):
    m = json.loads((damaged_copy / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (damaged_copy / MANIFEST).write_text(json.dumps(m))
    for command in (["run", str(damaged_copy), "x"], ["verify", str(damaged_copy)], ["info", str(damaged_copy)]):
        assert main(command) == 2
        one_line_error(capsys.readouterr().err, f"layout format {FORMAT_VERSION + 1} is newer than this moe "
                                                f"understands ({FORMAT_VERSION}); upgrade moe")


def test_paging_a_damaged_expert_names_layer_and_expert(damaged_copy, capsys):
    """Every expert of layer 1 damaged: the first one the router picks fails its checksum when paged in."""
    layout = open_layout(damaged_copy)
    budget = min_budget(layout)
    runs = layout.manifest["experts"]["1"]
    layout.close()
    for r in runs:
        flip_byte(damaged_copy / EXPERTS_FILE, r["offset"] + 100)
    code = main(["run", str(damaged_copy), "def add(a, b):", "--max-tokens", "5", "--memory-budget", str(budget)])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    one_line_error(err, f"{damaged_copy / EXPERTS_FILE}: layer 1 expert ", "fails its checksum",
                   "run `moe verify` and reconvert")


@pytest.mark.parametrize("edit, said", [
    (lambda m: m["config"].update(hidden_size=512), "tensor embed is q5 [4096, 256], the config implies [4096, 512]"),
    (lambda m: m["config"].update(vocab_size=8192), "the config implies [8192, 256]"),
    (lambda m: m["config"].update(num_experts=16), "expert runs do not match the config's 16 experts"),
    (lambda m: m["config"].update(num_experts=2**40, top_k=2), "expert runs do not match"),  # before 2**40 names
    (lambda m: m["tensors"].pop("layers.3.experts.7.down"), "tensor layers.3.experts.7.down is missing"),
    (lambda m: m["config"].update(head_dim=64), "tensor layers.0.attn.qkv is q5 [384, 256], the config implies"),
    (lambda m: m["tensors"]["layers.2.attn.o"].update(shape=[256, 128]), "tensor layers.2.attn.o is q6 [256, 128]"),
    (lambda m: m["tensors"]["norm"].update(encoding="bf16"), "the config implies [256] f32"),
    (lambda m: m["tensors"]["layers.0.experts.1.down"].update(scales_offset=m["experts"]["0"][1]["offset"] - 64),
     "tensor layers.0.experts.1.down lies outside its expert's run"),  # scales before the run: paging read past it
    (lambda m: m["config"].update(num_experts="8"), "config: num_experts must be int, not '8'"),
    (lambda m: m["config"]["layers"][1].update(attention="sliding"), "layer 1: sliding attention needs a positive window"),
    (lambda m: m["config"]["rope"].update(theta=1), "rope theta must be above 1"),
    (lambda m: m["experts"]["3"].append(m["experts"]["3"][0]),
     "expert runs do not match the config's 8 experts in layers 0, 1, 2, 3"),
])
def test_a_manifest_whose_config_disagrees_with_its_tensors_is_refused_at_load(damaged_copy, capsys, edit, said):
    """The runtime sizes its buffers from the config: a tensor of another shape would be read past its end."""
    m = json.loads((damaged_copy / MANIFEST).read_text())
    edit(m)
    (damaged_copy / MANIFEST).write_text(json.dumps(m))
    assert main(["run", str(damaged_copy), "x", "--max-tokens", "1"]) == 2
    one_line_error(capsys.readouterr().err, f"{damaged_copy / MANIFEST}: ", said, "reconvert the model")


def test_a_conversion_killed_outright_is_swept_by_the_next(big, tmp_path, env):
    """SIGKILL (the OOM killer, a power cut) leaves the temporary folder; the next conversion into the same
    output removes it, and leaves alone one whose process still runs."""
    proc = subprocess.Popen([sys.executable, "-m", "moe", "convert", str(big), "-o", str(tmp_path / "out")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    killed = wait_for_partial(tmp_path, "out", proc)
    proc.kill()
    proc.wait(timeout=60)
    assert killed.is_dir()
    with subprocess.Popen(["sleep", "60"]) as other:  # a conversion still running elsewhere
        alive = tmp_path / f".out.partial-{other.pid}"
        alive.mkdir()
        assert main(["convert", str(DEMO_SOURCE), "-o", str(tmp_path / "out")]) == 0
        other.kill()
    assert not killed.exists() and alive.is_dir()
    assert leftovers(tmp_path, "out") == [alive.name, "out"]


def test_nan_weights_in_model_bin_never_crash_and_verify_names_them(damaged_copy, env, capsys):
    """Four bytes of model.bin turned into NaN (the router of layer 0): the load names the tensor, as verify does;
    with its checksum forged too, routing must still pick experts in 0..E-1 (the kernels index buffers with them
    unchecked) and the run ends with one line."""
    import numpy as np
    from moe.runtime.kernels.routing import softmax_topk
    from moe.runtime.layout import crc32

    m = json.loads((damaged_copy / MANIFEST).read_text())
    router = m["tensors"]["layers.0.router"]
    E, H = router["shape"]
    nan = {"f32": np.float32(np.nan).tobytes(), "bf16": np.uint16(0x7FC0).tobytes()}[router["encoding"]]
    with open(damaged_copy / MODEL_FILE, "r+b") as f:
        for row in range(E):
            f.seek(router["offset"] + row * H * len(nan))
            f.write(nan)
    run = [sys.executable, "-m", "moe", "run", str(damaged_copy), "def add(a, b):", "--max-tokens", "8"]
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    one_line_error(done.stderr, "tensor layers.0.router fails its checksum", "moe verify")
    assert main(["verify", str(damaged_copy)]) == 1
    assert capsys.readouterr().out == f"{damaged_copy}: layer 0: checksum mismatch in tensor layers.0.router\n"
    with open(damaged_copy / MODEL_FILE, "rb") as f:
        f.seek(router["offset"])
        router["crc32"] = crc32(f.read(E * H * len(nan)))
    (damaged_copy / MANIFEST).write_text(json.dumps(m))
    done = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and done.stdout == "", done.stderr
    one_line_error(done.stderr, "non-finite logits", "moe verify")
    idx, weights = np.zeros((2, 3), np.int64), np.zeros((2, 3), np.float32)
    softmax_topk(np.array([[np.nan] * 8, [1, np.nan, 3, np.inf, 0, 2, np.nan, 1]], np.float32), 3, True, idx, weights)
    assert idx[0].tolist() == [0, 1, 2] and sorted(set(idx[1].tolist())) == sorted(idx[1].tolist())
    assert ((0 <= idx) & (idx < 8)).all()


def test_a_tokenizer_that_makes_tokenizers_panic_is_one_line(damaged_copy, capsys):
    """A Rust panic surfaces as pyo3's PanicException, a BaseException: caught at load, naming the file."""
    tokenizer = json.loads((damaged_copy / "tokenizer.json").read_text())
    tokenizer["model"]["continuing_subword_prefix"] = "#" * 40  # longer than the merges: BpeBuilder panics
    (damaged_copy / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert main(["run", str(damaged_copy), "x", "--max-tokens", "1"]) == 2
    one_line_error(capsys.readouterr().err, f"{damaged_copy / 'tokenizer.json'}: not a valid tokenizer file")


def test_any_other_base_exception_is_one_line(monkeypatch, capsys):
    import moe.cli.run

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    def panicking(*args):
        raise PanicException("index out of bounds: the len is 3 but the index is 7")

    monkeypatch.setattr(moe.cli.run, "open_model", panicking)
    assert main(["run", "x"]) == 1
    one_line_error(capsys.readouterr().err, "unexpected PanicException: index out of bounds", "MOE_DEBUG=1")


@pytest.mark.parametrize("kind, said", [("fifo", "is a FIFO (named pipe), not a file"),
                                        ("device", "is a character device, not a file"),
                                        ("folder", "is a folder, not a file")])
@pytest.mark.parametrize("fname", [EXPERTS_FILE, MODEL_FILE])
def test_a_layout_file_that_is_not_a_file_is_named_for_what_it_is(damaged_copy, capsys, fname, kind, said):
    path = damaged_copy / fname
    path.unlink()
    {"fifo": os.mkfifo, "device": lambda p: p.symlink_to("/dev/zero"), "folder": Path.mkdir}[kind](path)
    assert main(["run", str(damaged_copy), "x"]) == 1
    one_line_error(capsys.readouterr().err, f"{path}: {said}; reconvert the model")


def test_stdout_on_a_full_device_is_one_line(demo_q4, env):
    for args in (["run", str(demo_q4), "hello", "--max-tokens", "3"], ["info", str(demo_q4), "--json"], ["--version"]):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "moe", *args], stdout=full, stderr=subprocess.PIPE, text=True,
                                  env=env, timeout=300)
        assert done.returncode == 1
        one_line_error(done.stderr, "cannot write the output (No space left on device)")


def test_the_disk_check_shows_figures_that_differ(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 5000, 5000))
    assert main(["convert", str(DEMO_SOURCE), "-o", str(tmp_path / "out")]) == 1
    one_line_error(capsys.readouterr().err, f"{tmp_path}: 5.00 kB free, the converted model needs 4.28 MB")
    assert not (tmp_path / "out").exists()


def test_a_budget_just_below_the_minimum_shows_exact_bytes(demo_q4, capsys):
    layout = open_layout(demo_q4)
    least = min_budget(layout)
    layout.close()
    assert main(["run", str(demo_q4), "x", "--memory-budget", str(least - 1)]) == 2
    one_line_error(capsys.readouterr().err, f"memory budget {least - 1:,} bytes is below this model's minimum of "
                                            f"{least:,} bytes")


@pytest.mark.parametrize("group_size", [4096, 96, 10**9])
def test_a_group_size_that_pads_the_rows_is_refused_up_front(tmp_path, capsys, group_size):
    assert main(["convert", str(DEMO_SOURCE), "-o", str(tmp_path / "out"), "--group-size", str(group_size)]) == 2
    one_line_error(capsys.readouterr().err, f"--group-size {group_size}: pads this model's rows (128, 256 columns) "
                                            "more than --group-size 32 does; give one of 32, 64, 128")
    assert list(tmp_path.iterdir()) == []
