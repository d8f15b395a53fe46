"""Downloads that break, through huggingface_hub against a stand-in Hub on the loopback interface.

`FakeHub` answers the four requests snapshot_download makes (repo info, tree, HEAD and GET of
`resolve/`), can cut a file's body part-way or answer 500, and logs every request. What
huggingface_hub (2.x) resumes, and so what these tests show:
- within one run, a connection dropped mid-file is resumed with an HTTP Range request;
- across runs, every file completed before the failure stays in its cache and is not fetched again;
  the bytes of a file left unfinished are discarded (it writes to a process-unique temporary file
  and deletes it on failure), so that one file starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from moe.convert.demo import DEMO_SOURCE
from moe.runtime.layout import MANIFEST, verify

REPO = "org/tinymix"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
WEIGHTS = "model.safetensors"
CUT = 11 << 20  # where a dropped connection ends the body: past huggingface_hub's first 10 MiB chunk


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.cut: dict[str, int] = {}  # file -> how many more GETs end after CUT bytes of the body
        self.fail: dict[str, int] = {}  # file -> status every GET of it answers
        self.log: list[tuple[str, str, str | None]] = []  # (method, file or api path, Range header)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name`."""
        return [r for method, path, r in self.log if method == "GET" and path == name]


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        hub, path = self.server, self.path.split("?")[0]
        api = f"/api/models/{REPO}/"
        resolve = f"/{REPO}/resolve/{COMMIT}/"
        if path.startswith(api + "revision/"):
            return self._json({"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]})
        if path.startswith(api + "tree/"):
            return self._json([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                                "lfs": {"oid": _sha256(d), "size": len(d), "pointerSize": 134}}
                               for n, d in hub.files.items()])
        name = path[len(resolve):] if path.startswith(resolve) else None
        if name not in hub.files:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, start = hub.files[name], 0
        with hub._lock:
            hub.log.append(("GET" if body else "HEAD", name, self.headers.get("Range")))
            status = hub.fail.get(name) if body else None
            cut = body and hub.cut.get(name, 0) > 0
            if cut:
                hub.cut[name] -= 1
        if status:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{_sha256(data)}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if not body:
            return
        if cut:  # the connection drops part-way through the body
            self.wfile.write(data[start:CUT])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def _json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """The demo checkpoint with its two shards merged into one model.safetensors (12 MB)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("repo")
    tensors = {}
    for shard in sorted(DEMO_SOURCE.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    files = {p.name: p.read_bytes() for p in DEMO_SOURCE.iterdir() if p.suffix != ".safetensors"}
    del files["model.safetensors.index.json"]
    return {**files, WEIGHTS: (folder / WEIGHTS).read_bytes()}


@pytest.fixture
def hub(repo_files):
    server = FakeHub(repo_files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def env(isolated_home, hub):
    import moe.runtime.kernels  # noqa: F401  (sets NUMBA_CACHE_DIR, which the children share)

    env = {**os.environ, "MOE_HOME": str(isolated_home / "moe"), "HF_HOME": str(isolated_home / "hf"),
           "HF_HUB_CACHE": str(isolated_home / "hf" / "hub"), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1"}
    for key in ("MOE_DEBUG", "HF_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(key, None)
    return env


def convert(env, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe", "convert", REPO, "-o", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)


def blobs(env) -> dict[str, Path]:
    """The cache's blobs of the repo, by name (every name here is its content's sha256), and nothing else."""
    folder = Path(env["HF_HUB_CACHE"]) / ("models--" + REPO.replace("/", "--")) / "blobs"
    return {p.name: p for p in folder.iterdir()} if folder.is_dir() else {}


def test_dropped_connection_resumes_with_a_range_request(hub, env, tmp_path):
    assert len(hub.files[WEIGHTS]) > CUT
    hub.cut[WEIGHTS] = 1
    done = convert(env, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'out'}\n" and "Traceback" not in done.stderr
    first, second = hub.gets(WEIGHTS)
    assert first is None
    resumed_at = int(second.removeprefix("bytes=").removesuffix("-"))  # the retry asks only for the rest
    assert 0 < resumed_at <= CUT
    cached = blobs(env)
    assert set(cached) == {_sha256(d) for d in hub.files.values()}  # every file, no leftover temporary file
    assert all(cached[_sha256(d)].read_bytes() == d for d in hub.files.values())
    assert verify(tmp_path / "out") == []


def test_failed_download_is_one_line_and_a_rerun_fetches_only_what_is_missing(hub, env, tmp_path):
    hub.fail[WEIGHTS] = 500
    out = tmp_path / "out"
    done = convert(env, out)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines == [f"error: {REPO}: the Hugging Face Hub answered 500; try again later"], done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder
    cached = blobs(env)
    assert _sha256(hub.files[WEIGHTS]) not in cached
    assert all(p.read_bytes() == hub.files[n] for n in hub.files if n != WEIGHTS
               for p in [cached[_sha256(hub.files[n])]])
    first_gets = {n: len(hub.gets(n)) for n in hub.files}

    del hub.fail[WEIGHTS]
    done = convert(env, out)
    assert done.returncode == 0, done.stderr
    for name in hub.files:  # what the first run completed is not fetched again
        assert len(hub.gets(name)) == first_gets[name] + (name == WEIGHTS), name
    assert blobs(env)[_sha256(hub.files[WEIGHTS])].read_bytes() == hub.files[WEIGHTS]
    assert (out / MANIFEST).is_file() and verify(out) == []
