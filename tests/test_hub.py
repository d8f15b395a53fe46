"""Hub ids resolve through huggingface_hub's own cache logic, offline, from a cache folder the test builds."""

import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import errors
from moe.convert import convert, hub
from moe.runtime.errors import MoeError
from moe.runtime.home import moe_home
from tiny import make_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A model in HF_HUB_CACHE's layout: blobs by hash, snapshots/<commit>/ symlinks, refs/main."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    folder = make_checkpoint("qwen3_moe", tmp_path_factory.mktemp("src"), shards=2)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_hub_id_converts_offline_from_the_cache(checkpoint_files):
    cache_repo("org/tiny-qwen", checkpoint_files)
    out = convert("org/tiny-qwen")
    assert out == moe_home() / "models" / "org--tiny-qwen"
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"] == {"id": "org/tiny-qwen", "revision": COMMIT, "hf_architecture": "Qwen3MoeForCausalLM"}
    out8 = convert("org/tiny-qwen", bits=8, revision=COMMIT)
    assert out8.name == "org--tiny-qwen-q8"


def test_missing_repo_offline_is_one_clear_line():
    with pytest.raises(MoeError, match="org/absent: not in the Hugging Face cache, and the Hub is unreachable"):
        convert("org/absent")


def test_unknown_revision_offline(checkpoint_files):
    cache_repo("org/tiny-rev", checkpoint_files)
    with pytest.raises(MoeError, match="org/tiny-rev at revision v2: not in the Hugging Face cache"):
        convert("org/tiny-rev", revision="v2")


def test_pickle_only_repo(checkpoint_files):
    cache_repo("org/old", {"config.json": checkpoint_files["config.json"], "pytorch_model.bin": b"\x80\x02"})
    with pytest.raises(MoeError, match="org/old: only pickle weights \\(pytorch_model.bin\\)"):
        convert("org/old")
    assert not (moe_home() / "models" / "org--old").exists()


def test_only_the_files_conversion_needs_are_requested(monkeypatch, tmp_path):
    calls = []
    folder = tmp_path / COMMIT

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        folder.mkdir(exist_ok=True)
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    source = hub.resolve("org/name", "main")
    assert source.folder == folder and source.revision == COMMIT
    small = ["config.json", "model.safetensors.index.json", "tokenizer*", "generation_config.json",
             "special_tokens_map.json", "chat_template.jinja"]
    assert calls == [("org/name", "main", small),
                     ("org/name", COMMIT, small + ["model-00001-of-00002.safetensors",
                                                   "model-00002-of-00002.safetensors"])]


def http_error(cls, status):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return cls("boom", response=response)


@pytest.mark.parametrize("raised, match", [
    (lambda: http_error(errors.GatedRepoError, 403), "org/x: gated on the Hugging Face Hub; accept its terms"),
    (lambda: http_error(errors.RepositoryNotFoundError, 404), "org/x: no such model on the Hugging Face Hub"),
    (lambda: http_error(errors.RevisionNotFoundError, 404), "org/x: no revision 'main'"),
    (lambda: httpx2.ConnectError("no route to host"), "org/x: talking to the Hugging Face Hub failed \\(ConnectError"),
])
def test_hub_failures_become_one_line(monkeypatch, raised, match):
    def fake_download(*args, **kwargs):
        raise raised()

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    with pytest.raises(MoeError, match=match) as info:
        hub.resolve("org/x", "main")
    assert "\n" not in str(info.value)


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(MoeError, match="no such folder, and not a Hub id"):
        hub.resolve("not/a/hub/id")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(MoeError, match="is a file"):
        hub.resolve(str(tmp_path / "file.txt"))
