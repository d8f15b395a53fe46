"""Files from strangers: nothing in them executes, and no name in them becomes a path outside the output.

- weights are read from safetensors only: a pickle (.bin) beside them or instead of them is never
  loaded, and Python files a config points at (`auto_map`, trust_remote_code) are never imported;
- chat templates render in jinja2's immutable sandbox: reaching for Python internals is a MoeError;
- tensor names are manifest keys, never file names: the layout is manifest.json, model.bin,
  experts.bin and the tokenizer files, whatever the checkpoint calls its tensors; an index or a
  manifest that names a file outside its folder is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
from moe.cli import main
from moe.convert import convert
from moe.convert.demo import DEMO_SOURCE
from moe.convert.tokenizer_facts import TOKENIZER_FILES
from moe.runtime.errors import MoeError
from moe.runtime.home import default_output, models_dir
from moe.runtime.layout import EXPERTS_FILE, MANIFEST, MODEL_FILE, read_manifest
from moe.runtime.tokenizer import Tokenizer, render_chat_template
from test_faults import one_line_error

LAYOUT_FILES = {MANIFEST, MODEL_FILE, EXPERTS_FILE}


class _Trap:
    """Unpickling this writes the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran"))


def booby_trapped(folder: Path, marker: Path, pickles=("pytorch_model.bin",)) -> None:
    """Pickles that write `marker` when loaded, and remote code that writes it when imported."""
    for name in pickles:
        (folder / name).write_bytes(pickle.dumps(_Trap(marker)))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "configuration_evil.py").write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def demo_src(tmp_path) -> Path:
    folder = shutil.copytree(DEMO_SOURCE, tmp_path / "src")
    for p in folder.iterdir():
        p.chmod(0o644)
    return folder


def test_pickles_and_remote_code_beside_safetensors_are_never_run(demo_src, tmp_path, capsys):
    marker = tmp_path / "marker"
    booby_trapped(demo_src, marker, pickles=("pytorch_model.bin", "training_args.bin", "optimizer.pt"))
    pickle.loads((demo_src / "optimizer.pt").read_bytes())
    assert marker.exists()  # the trap works
    marker.unlink()
    out = tmp_path / "out"
    assert main(["convert", str(demo_src), "-o", str(out)]) == 0
    assert not marker.exists()
    assert {p.name for p in out.iterdir()} == LAYOUT_FILES | {f for f in TOKENIZER_FILES if (demo_src / f).exists()}


@pytest.mark.parametrize("pickles", [("pytorch_model.bin",), ("model.pt", "model.ckpt"),
                                     ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")])
def test_a_pickle_only_checkpoint_is_refused(demo_src, tmp_path, capsys, pickles):
    marker = tmp_path / "marker"
    for shard in demo_src.glob("*.safetensors"):
        shard.unlink()
    (demo_src / "model.safetensors.index.json").unlink()
    booby_trapped(demo_src, marker, pickles)
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, f"only pickle weights ({sorted(pickles)[0]}", "never loads",
                   "use a checkpoint with .safetensors weights")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- chat templates

ESCAPES = [
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ strftime_now.__globals__ }}",
    "{{ raise_exception.__code__ }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ (1).__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages[0].items.__self__.__class__ }}",
    "{{ messages | attr('__class__') }}",
    "{{ (messages | map(attribute='__class__') | list)[0].__init__ }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "{{ '{0.__class__}' | format(messages) }}",
    "{{ dict.__base__.__subclasses__() }}",
    "{{ range.__globals__ }}",
    "{% set g = cycler.__init__.__globals__ %}{{ g }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{% set x = messages.pop() %}",
    "{% set x = messages[0].clear() %}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{% extends '/etc/hostname' %}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{{ 'x' * 10**15 }}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_template_escapes_are_errors_not_access(template, tmp_path):
    marker = tmp_path / "marker"
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(MoeError) as info:
        render_chat_template(template.replace("{marker}", str(marker)), messages, bos_token="<s>")
    message = str(info.value)
    assert message.startswith("chat template") and "\n" not in message and info.value.exit_code == 2
    assert messages == [{"role": "user", "content": "hi"}] and not marker.exists()
    for secret in ("<function", "<module", "<class", "__builtins__", "root:"):  # nothing it reached is echoed
        assert secret not in message


# Every construct that loops or grows, past its bound: (template, what the one line names).
UNBOUNDED = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "work exceeds 1,000,000 steps"),
    ("{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}{% endfor %}", "work exceeds"),
    ("{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}", "recursion exceeds"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion exceeds"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "exceeds 2 s"),
    ("{% set s = 'x' * 900000 %}{% for i in range(100000) %}{% if 'xy' in s %}{% endif %}{% endfor %}", "exceeds 2 s"),
    ("{% for i in range(10**9) %}{% endfor %}", "range() of 1,000,000,000 items exceeds"),
    ("{{ lipsum(10**6) }}", "lipsum() makes"),
    ("{{ lipsum(1, min=10**8, max=10**8) }}", "lipsum() makes"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "the ~ operator"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "the + operator"),
    ("{{ 'x' * 10**15 }}", "the * operator makes 1,000,000,000,000,000 characters"),
    ("{{ ['x'] * 10**9 }}", "the * operator"),
    ("{{ 9 ** 1000000000 }}", "the ** operator"),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "the * operator"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}xxxxxxxxxxxxxxxxxxxxxxxx{% endif %}{% endmacro %}"
     "{{ f(30) }}", "in all"),
    ("{% macro m() %}{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}{% endmacro %}{{ m() }}", "its output"),
    ("{% for i in range(100000) %}" + "y" * 1000 + "{% endfor %}", "its output"),
    ("{% set s = 'x' * 900000 %}{% set b %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endset %}", "in all"),
    ("{% set s = 'x' * 900000 %}{{ [s, s, s, s] | string }}", "a value makes"),
    ("{% set s = 'x' * 900000 %}{% for i in range(100000) %}{% set l = [s, s] %}{% endfor %}", "a value makes"),
    ("{{ range(100000) | map('string') | join('x' * 900000) }}", "filter join"),
    ("{{ ('x' * 900000).join(range(100000) | map('string')) }}", "str.join()"),
    ("{{ 'x' | center(10**9) }}", "filter center"),
    ("{{ 'x'.center(10**9) }}", "str.center()"),
    ("{{ 'x'.ljust(10**9) }}", "str.ljust()"),
    ("{{ 'x'.zfill(10**9) }}", "str.zfill()"),
    ("{{ ('x\n' * 100000) | indent(10**5) }}", "filter indent"),
    ("{{ ('x ' * 100000) | wordwrap(1, wrapstring='y' * 1000) }}", "filter wordwrap"),
    ("{{ '%*s' | format(10**9, 'x') }}", "filter format"),
    ("{{ '%0999999999d' | format(1) }}", "filter format"),
    ("{{ '%*s' % (10**9, 'x') }}", "the % operator"),
    ("{{ '{:>999999999}'.format('x') }}", "str.format()"),
    ("{{ '{0:{1}}'.format('x', 10**9) }}", "str.format()"),
    ("{{ ('x' * 100000).replace('x', 'y' * 100000) }}", "str.replace()"),
    ("{{ ('x' * 100000) | replace('x', 'y' * 100000) }}", "filter replace"),
    ("{{ ('\t' * 100000).expandtabs(100000) }}", "str.expandtabs()"),
    ("{{ ('x' * 100000).translate({120: 'y' * 1000}) }}", "str.translate()"),
    ("{{ (1).to_bytes(10**9, 'big') }}", "int.to_bytes()"),
    ("{{ [1] | batch(10**9, 'x') | list }}", "filter batch"),
    ("{{ [1] | slice(10**9) | list }}", "filter slice"),
    ("{{ range(1000) | map('string') | map('list') | sum(start=[]) }}", "filter sum"),
    ("{{ messages | tojson(indent=10**9) }}", "filter tojson"),
    ("x" * 300_000, "300,000 characters exceed the limit of 256,000"),
]


@pytest.mark.parametrize("template, names", UNBOUNDED)
def test_templates_that_loop_or_grow_without_bound_are_refused_promptly(template, names):
    start = time.perf_counter()
    with pytest.raises(MoeError) as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert message.startswith("chat template: ") and names in message and "\n" not in message, message
    assert message.endswith("the template is unsafe or broken; do not use it") and info.value.exit_code == 2


def test_the_bounds_grow_with_the_conversation():
    """A prompt longer than LIMIT_FLOOR, copied a few times by the template, still renders."""
    content = "x" * 3_000_000
    out = render_chat_template("{% for m in messages %}{{ m.content | trim + '\n' }}{% endfor %}{{ messages | tojson }}",
                               [{"role": "user", "content": content}])
    assert len(out) == 2 * len(content) + len('\n[{"role": "user", "content": ""}]')


def test_a_template_raising_a_long_message_is_one_line():
    with pytest.raises(MoeError) as info:
        render_chat_template("{{ raise_exception('no\nsystem\n' + 'x' * 5000) }}", [])
    assert str(info.value).startswith("chat template: no system xxx") and len(str(info.value)) < 400


def test_hostile_template_in_a_model_is_one_line_from_run(tmp_path, capsys):
    model = convert(DEMO_SOURCE, tmp_path / "model")
    marker = tmp_path / "marker"
    m = json.loads((model / MANIFEST).read_text())
    m["tokenizer"]["chat_template"] = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    (model / MANIFEST).write_text(json.dumps(m))
    assert main(["run", str(model), "hello", "--chat", "--max-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not marker.exists()
    one_line_error(err, "chat template refused by the sandbox")
    tok = Tokenizer.from_folder(model, m)
    with pytest.raises(MoeError, match="sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- names that look like paths


def _with_tensors(demo_src: Path, extra: dict) -> None:
    """demo_src's weights as one model.safetensors (no index) plus `extra` tensors."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for shard in sorted(demo_src.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    (demo_src / "model.safetensors.index.json").unlink()
    save_file({**tensors, **extra}, demo_src / "model.safetensors")


@pytest.mark.parametrize("name", ["../../escaped.bin", "/tmp/moe-escaped.bin", "model.bin", "../model.bin"])
def test_tensor_names_that_look_like_paths_are_refused_and_written_nowhere(demo_src, tmp_path, capsys, name):
    import torch

    _with_tensors(demo_src, {name: torch.zeros(4)})
    before = {p for p in tmp_path.rglob("*")}
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out" / "model")]) == 2
    one_line_error(capsys.readouterr().err, f"tensor {name} not expected for a mixtral model")
    assert {p for p in tmp_path.rglob("*")} == before and not Path("/tmp/moe-escaped.bin").exists()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/model.safetensors",
                                   "model.bin"])
def test_an_index_naming_files_outside_the_folder_is_refused(demo_src, tmp_path, capsys, shard):
    index = json.loads((demo_src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (demo_src / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(demo_src / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, f"names {shard!r}, which is not a .safetensors file in this folder")
    assert not (tmp_path / "out").exists()


def test_the_layout_is_three_files_whatever_the_tensors_are_called(tmp_path):
    out = convert(DEMO_SOURCE, tmp_path / "out")
    m = json.loads((out / MANIFEST).read_text())
    assert {p.name for p in out.iterdir()} == LAYOUT_FILES | set(m["tokenizer"]["files"])
    assert set(m["tokenizer"]["files"]) <= set(TOKENIZER_FILES)
    assert {e["file"] for e in m["tensors"].values()} == {MODEL_FILE, EXPERTS_FILE}
    assert all(not Path(name).is_absolute() and ".." not in name.split("/") and "/" not in name for name in m["tensors"])


@pytest.mark.parametrize("file", ["../../etc/passwd", "/etc/passwd", "manifest.json", "tokenizer.json"])
def test_a_manifest_naming_another_file_is_refused(tmp_path, file):
    out = convert(DEMO_SOURCE, tmp_path / "out")
    m = json.loads((out / MANIFEST).read_text())
    m["tensors"]["embed"]["file"] = file
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MoeError, match=f"malformed manifest .*tensor embed: unknown file '{file}'") as info:
        read_manifest(out)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("src", ["org/..", "org/.", "..", "a/../..", "org/...", "org/.hidden"])
def test_default_outputs_stay_inside_the_models_folder(src):
    out = default_output(src, 4)
    assert out.parent == models_dir() and out.name not in ("", ".", "..")


# ---- JSON nested past what Python parses, and files that are not files

NESTED = b"[" * 200_000


def test_a_nested_manifest_is_one_line_and_moe_list_still_lists_the_rest(tmp_path, capsys):
    good = convert(DEMO_SOURCE, models_dir() / "good")
    for name, make in {"nested": lambda p: p.write_bytes(NESTED), "fifo": os.mkfifo,
                       "device": lambda p: p.symlink_to("/dev/zero")}.items():
        bad = shutil.copytree(good, models_dir() / name)
        (bad / MANIFEST).unlink()
        make(bad / MANIFEST)
    assert main(["run", str(models_dir() / "nested"), "hi"]) == 2
    one_line_error(capsys.readouterr().err, f"{models_dir() / 'nested' / MANIFEST}: JSON nested too deeply to read; "
                                            "reconvert the model")
    assert main(["list"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows == {"device": ["unreadable", "?"], "fifo": ["unreadable", "?"], "good": ["mixtral", "4"],
                    "nested": ["unreadable", "?"]} and "None" not in out
    assert err.splitlines() == [
        f"warning: device is unreadable: {models_dir() / 'device' / MANIFEST}: is a character device, not a file; "
        "reconvert the model",
        f"warning: fifo is unreadable: {models_dir() / 'fifo' / MANIFEST}: is a FIFO (named pipe), not a file; "
        "reconvert the model",
        f"warning: nested is unreadable: {models_dir() / 'nested' / MANIFEST}: JSON nested too deeply to read; "
        "reconvert the model"]
    assert main(["list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["good"]["bits"] == 4 and "nested too deeply" in listed["nested"]["error"]


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "special_tokens_map.json", "model.safetensors.index.json", "tokenizer.json"])
def test_nested_json_in_a_source_is_one_line(demo_src, tmp_path, capsys, name):
    (demo_src / name).write_bytes(NESTED)
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, f"{demo_src / name}: JSON nested too deeply to read; ")
    assert not (tmp_path / "out").exists()


def test_a_nested_safetensors_header_is_one_line(demo_src, tmp_path, capsys):
    shard = demo_src / "model-00001-of-00002.safetensors"
    shard.write_bytes(len(NESTED).to_bytes(8, "little") + NESTED)
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, f"{shard}: not a valid safetensors file (header is not valid JSON)")


@pytest.mark.parametrize("profile, said", [("nested", "JSON nested too deeply to read"),
                                           ("/dev/zero", "is a character device, not a file")])
def test_a_pin_profile_that_is_nested_or_endless_is_one_line(tmp_path, capsys, profile, said):
    model = convert(DEMO_SOURCE, tmp_path / "model")
    if profile == "nested":
        profile = tmp_path / "nested.json"
        profile.write_bytes(NESTED)
    assert main(["run", str(model), "hi", "--pin", str(profile), "--memory-budget", "1GB"]) == 2
    one_line_error(capsys.readouterr().err, f"--pin {profile}: {said}; make one with `moe profile MODEL FILE -o ")


def test_readers_that_fall_back_treat_nested_json_as_unreadable(tmp_path):
    from moe.convert.demo import _current
    from moe.convert.hub import _indexed_shards
    from moe.runtime.speed import _read_json

    (tmp_path / MANIFEST).write_bytes(NESTED)
    (tmp_path / "model.safetensors.index.json").write_bytes(NESTED)
    assert _current(tmp_path / MANIFEST) is False
    assert _indexed_shards(tmp_path) is None
    assert _read_json(tmp_path / MANIFEST) == {}


def test_a_chat_template_file_that_is_not_utf8_is_one_line(demo_src, tmp_path, capsys):
    (demo_src / "chat_template.jinja").write_bytes(b"{{ 'caf\xe9' }}")
    assert main(["convert", str(demo_src), "-o", str(tmp_path / "out")]) == 2
    one_line_error(capsys.readouterr().err, f"{demo_src / 'chat_template.jinja'}: not UTF-8 text (byte 7)")
