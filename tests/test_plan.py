"""`moe plan`: sizes equal the converted model's, headers only over a loopback Hub, clear errors, the speed model."""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import moe.convert.miniature
import moe.runtime.speed
import numpy as np
import pytest
from huggingface_hub import constants
from moe.cli import main
from moe.convert import convert, miniature, plan
from moe.runtime import speed
from moe.runtime.errors import MoeError
from moe.runtime.info import model_info
from moe.runtime.layout import open_layout, stored_nbytes
from moe.runtime.paging import min_budget, slot_bytes
from tiny import make_checkpoint

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
RATES = {"memory_bandwidth": 2e10, "matvec": {e: 1e10 for e in speed.ENCODINGS}, "cached_read": 1e10,
         "disk_read": 1e9, "threads": 2, "measured_at": "test"}
MINI = {"decode_s": 1e-3, "lookup_s": 2e-6, "predict_s": 3e-6, "miss_s": 1e-5, "bytes_per_token_by_encoding": {}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "qwen3_moe": make_checkpoint("qwen3_moe", root / "qwen", shards=2),
        "gpt_oss": make_checkpoint("gpt_oss", root / "gptoss", mxfp4=True, hidden_size=64, intermediate_size=64),
        "llama4_multimodal": make_checkpoint("llama4_multimodal", root / "llama4mm"),
        "mixtral": make_checkpoint("mixtral", root / "mix", dtype="f16"),
        "glm4_moe": make_checkpoint("glm4_moe", root / "glm"),
        "qwen3_5_moe": make_checkpoint("qwen3_5_moe", root / "qwen35"),
    }


@pytest.mark.parametrize("arch,bits", [("qwen3_moe", 4), ("gpt_oss", 4), ("llama4_multimodal", 8), ("mixtral", 16),
                                       ("glm4_moe", 4), ("qwen3_5_moe", 4)])
def test_figures_equal_the_converted_model(checkpoints, tmp_path, arch, bits):
    src = checkpoints[arch]
    hf, headers = plan.read_source(str(src))
    fig = plan.figures(hf, headers, bits)
    out = convert(str(src), tmp_path / "out", bits=bits)
    info = model_info(out)
    layout = open_layout(out)
    assert fig["layout_bytes"] == info["size_bytes"] == (out / "model.bin").stat().st_size + (out / "experts.bin").stat().st_size
    assert fig["model_bin_bytes"] == (out / "model.bin").stat().st_size
    assert fig["total_params"] == info["total_params"] and fig["active_params"] == info["active_params"]
    assert fig["slot_bytes"] == slot_bytes(layout) and fig["min_budget_bytes"] == min_budget(layout)
    runs = [r["nbytes"] for rs in layout.manifest["experts"].values() for r in rs]
    assert fig["expert_run_bytes"] == max(runs)
    cfg = info["top_k"] * len(layout.manifest["experts"])
    assert fig["expert_bytes_per_token"] == cfg * max(runs)  # every expert of a layer has the same size
    tensors = layout.manifest["tensors"]
    non_expert = sum(stored_nbytes(e) for n, e in tensors.items() if ".experts." not in n and n != "embed")
    states = 2 * 4 * len(layout.config.linear_layers()) * layout.config.recurrent_state_width
    assert (states > 0) == (arch == "qwen3_5_moe")  # its linear attention's states are read and written per token
    assert fig["bytes_per_token"] == non_expert + fig["expert_bytes_per_token"] + states == info["bytes_per_token"]
    kinds = {k: sorted(v.split(", ")) for k, v in layout.manifest["quantization"].items()
             if k not in ("bits", "group_size", "scheme")}
    assert fig["quantization"] == kinds
    layout.close()


def test_local_folder_reads_headers_only(checkpoints, monkeypatch):
    """No tensor is ever read: the plan holds with every tensor's data unreadable."""
    from moe.convert import safetensors_io

    def no_data(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "raw", no_data)
    hf, headers = plan.read_source(str(checkpoints["qwen3_moe"]))
    assert plan.figures(hf, headers)["layout_bytes"] > 0


# ---- a Hub on loopback


class Hub:
    """A Hub-like HTTP server for one repo: HEAD/GET /{repo}/resolve/{rev}/{file} (with Range), counting bytes."""

    def __init__(self, repo: str, folder: Path, gated: bool = False):
        self.repo, self.gated = repo, gated
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        self.served: dict[str, int] = {}  # file -> body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", h.path.split("?")[0])
        if m is None or m.group(1) != self.repo:
            return self.error(h, 404, "RepoNotFound")
        if self.gated:
            return self.error(h, 403, "GatedRepo")
        if m.group(2) not in ("main", COMMIT):
            return self.error(h, 404, "RevisionNotFound")
        data = self.files.get(m.group(3))
        if data is None:
            return self.error(h, 404, "EntryNotFound")
        start, end, status = 0, len(data) - 1, 200
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if rng:
            start, status = int(rng.group(1)), 206
            end = min(int(rng.group(2)) if rng.group(2) else end, len(data) - 1)
        part = data[start: end + 1]
        h.send_response(status)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(part) if body or status == 206 else len(data)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if body:
            h.wfile.write(part)
            self.served[m.group(3)] = self.served.get(m.group(3), 0) + len(part)

    @staticmethod
    def error(h: BaseHTTPRequestHandler, status: int, code: str) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub pointed at a loopback Hub (started by `serve`), offline mode off."""
    hubs = []

    def serve(repo: str, folder: Path, **kw) -> Hub:
        hub = Hub(repo, folder, **kw)
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        return hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield serve
    for hub in hubs:
        hub.close()


def test_hub_id_fetches_only_headers_and_gives_the_local_figures(checkpoints, online):
    src = checkpoints["qwen3_moe"]
    hub = online("org/tiny-qwen", src)
    hf, headers = plan.read_source("org/tiny-qwen")
    remote = plan.figures(hf, headers)
    local = plan.figures(*plan.read_source(str(src)))
    assert headers.revision == COMMIT
    assert {k: v for k, v in remote.items() if k not in ("source", "revision")} == \
           {k: v for k, v in local.items() if k not in ("source", "revision")}
    shards = [n for n in hub.files if n.endswith(".safetensors")]
    assert len(shards) == 2
    weights = sum(len(hub.files[n]) for n in shards)
    fetched = sum(hub.served.get(n, 0) for n in shards)
    assert 0 < fetched <= 2 * 100_001 and fetched < weights / 4  # the first 100 kB of each shard, at most
    assert all(r is not None for c, p, r in hub.requests if c == "GET" and p.endswith(".safetensors"))
    assert set(hub.served) <= {"config.json", "model.safetensors.index.json", *shards}


def test_hub_errors_are_one_line(checkpoints, online, tmp_path):
    src = checkpoints["qwen3_moe"]
    online("org/tiny-qwen", src)
    with pytest.raises(MoeError, match="org/other: no such model on the Hugging Face Hub") as e:
        plan.read_source("org/other")
    assert e.value.exit_code == 2
    with pytest.raises(MoeError, match="no revision 'v9'"):
        plan.read_source("org/tiny-qwen", "v9")
    online("org/gated", src, gated=True)
    with pytest.raises(MoeError, match="org/gated: gated on the Hugging Face Hub"):
        plan.read_source("org/gated")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for f in src.iterdir():
        (unknown / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["FooForCausalLM"],
                                                      "model_type": "foo"}))
    online("org/foo", unknown)
    with pytest.raises(MoeError, match="unsupported architecture \\(FooForCausalLM\\); moe converts"):
        plan.figures(*plan.read_source("org/foo"))


def test_no_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", lambda s: None)  # its retries' back-off
    closed = "http://127.0.0.1:9"  # discard port: nothing listens
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    with pytest.raises(MoeError, match="org/name: .*(Hub is unreachable|talking to the Hugging Face Hub failed)"):
        plan.read_source("org/name")


def test_offline_without_cache_is_one_line():
    with pytest.raises(MoeError, match="org/name: not in the Hugging Face cache, and the Hub is unreachable \\(offline mode or no network\\)"):
        plan.read_source("org/name")


def test_bad_sources(tmp_path):
    with pytest.raises(MoeError, match="not a Hub id"):
        plan.read_source("not a/valid id!")
    (tmp_path / "f").write_text("x")
    with pytest.raises(MoeError, match="is a file"):
        plan.read_source(str(tmp_path / "f"))
    with pytest.raises(MoeError, match="config.json: missing"):
        plan.read_source(str(tmp_path))


# ---- the speed model


def test_hit_rate_formula():
    assert speed.hit_rate(0) == 0 and speed.hit_rate(1) == 1 and speed.hit_rate(2) == 1
    assert speed.hit_rate(0.5) == pytest.approx(1 - 0.5 ** speed.HIT_EXPONENT)
    h = [speed.hit_rate(f) for f in np.linspace(0, 1, 11)]
    assert all(b > a for a, b in zip(h, h[1:], strict=False)) and all(x >= f for x, f in zip(h, np.linspace(0, 1, 11), strict=True))


def test_prediction_adds_up(checkpoints):
    fig = plan.figures(*plan.read_source(str(checkpoints["qwen3_moe"])))
    in_ram = speed.predict(fig, RATES, MINI)
    assert in_ram["decode_tok_s"] == pytest.approx(1 / (1e-3 + fig["bytes_per_token"] / 1e10))
    full = fig["moe_layers"] * fig["experts"] * fig["slot_bytes"]
    speeds = [speed.predict(fig, RATES, MINI, int(full * f), available=0, prefetch=False)["decode_tok_s"]
              for f in (0.25, 0.5, 1.0)]
    lookups = fig["top_k"] * fig["moe_layers"]
    assert speeds[0] < speeds[1] < speeds[2] == pytest.approx(1 / (1 / in_ram["decode_tok_s"] + lookups * 2e-6))
    quarter = speed.predict(fig, RATES, MINI, full // 4, available=0, prefetch=False)
    misses = (1 - speed.hit_rate(0.25)) * lookups
    assert quarter["misses_from"] == "disk"
    assert quarter["expert_bytes_read_per_token"] == pytest.approx(misses * fig["expert_run_bytes"])
    miss = fig["expert_run_bytes"] / 1e9 + 1e-5
    assert 1 / quarter["decode_tok_s"] == pytest.approx(1 / in_ram["decode_tok_s"] + lookups * 2e-6 + misses * miss)
    assert speed.predict(fig, RATES, MINI, full // 4, available=0) == quarter  # 4 slots: too few to prefetch
    ahead = speed.predict(fig, RATES, MINI, full // 2, available=0)  # prefetch: more reads, routers run ahead
    misses = (1 - speed.hit_rate(0.5)) * lookups
    assert 1 / ahead["decode_tok_s"] == pytest.approx(1 / in_ram["decode_tok_s"] + lookups * 2e-6
                                                      + fig["moe_layers"] * 3e-6 + speed.PREFETCH_READS * misses * miss)
    cached = speed.predict(fig, RATES, MINI, full // 4, available=10**12)
    assert cached["misses_from"] == "page cache" and cached["decode_tok_s"] > quarter["decode_tok_s"]
    with pytest.raises(MoeError, match="below the minimum"):
        speed.predict(fig, RATES, MINI, fig["min_budget_bytes"] - 1)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "llama4_multimodal", "glm4_moe"])
def test_miniature_runs(checkpoints, tmp_path, arch):
    """The miniature keeps layers, experts and top-k, shrinks every width, and decodes."""
    hf = json.loads((checkpoints[arch] / "config.json").read_text())
    fig = miniature.write_miniature(miniature.mini_config(hf), 4, 32, tmp_path)
    real = plan.figures(*plan.read_source(str(checkpoints[arch])))
    for key in ("layers", "moe_layers", "experts", "top_k"):
        assert fig[key] == real[key]
    seconds, misses, lookups = speed._time_decode(tmp_path, fig["min_budget_bytes"])
    assert seconds > 0 and misses == lookups == fig["top_k"] * fig["moe_layers"]
    held = speed._time_decode(tmp_path, fig["moe_layers"] * fig["experts"] * fig["slot_bytes"], passes=2)
    assert held[1] == 0 and held[2] == lookups


@pytest.mark.parametrize("layout_bytes, whole", [(1 << 20, True), (1 << 30, False)])
def test_small_model_is_timed_at_its_own_size(checkpoints, monkeypatch, isolated_home, layout_bytes, whole):
    """Up to SMALL_MODEL_BYTES the miniature keeps the model's widths, so it touches the model's own bytes."""
    monkeypatch.setattr(speed, "machine", lambda remeasure=False, say=None: RATES)
    monkeypatch.setattr(speed, "_time_decode", lambda folder, budget, passes=1, prefetch=False: (1e-3, 1.0, 2.0))
    hf = json.loads((checkpoints["qwen3_moe"] / "config.json").read_text())
    real = plan.figures(*plan.read_source(str(checkpoints["qwen3_moe"])))
    mini = miniature.overhead(hf, 4, layout_bytes=layout_bytes)
    assert (mini["bytes_per_token_by_encoding"] == real["bytes_per_token_by_encoding"]) == whole


def test_measurements_are_cached(monkeypatch, isolated_home):
    monkeypatch.setattr(speed, "BANDWIDTH_BYTES", 1 << 20)
    monkeypatch.setattr(speed, "matvec_rate", lambda enc: 1e9)
    monkeypatch.setattr(speed, "read_rates", lambda folder: (2e9, 1e9))
    said = []
    first = speed.machine(say=said.append)
    assert said and first["matvec"]["q4"] == 1e9 and first["memory_bandwidth"] > 0
    assert speed.machine(say=said.append) == first and len(said) == 1
    assert (isolated_home / "moe" / speed.MACHINE_FILE).is_file()


def test_read_rates_measure_a_temporary_file(tmp_path):
    cached, disk = speed.read_rates(tmp_path, 8 << 20)
    assert cached > 0 and disk > 0 and not list(tmp_path.iterdir())


def test_cli_plan_json_and_text(checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(moe.runtime.speed, "machine", lambda remeasure=False, say=None: RATES)
    monkeypatch.setattr(moe.convert.miniature, "overhead", lambda hf, bits, **options: MINI)
    src = str(checkpoints["qwen3_moe"])
    assert main(["plan", src, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    for key in ("layout_bytes", "ram_bytes", "min_budget_bytes", "predicted_decode_tok_s"):
        assert isinstance(facts[key], (int, float))
    assert facts["verdict"] == "fits in RAM"
    assert main(["plan", src, "--memory", str(facts["ram_bytes"] - 1), "--json"]) == 0
    paged = json.loads(capsys.readouterr().out)
    assert paged["verdict"].startswith("runs with paging at about ")
    assert paged["predicted_decode_tok_s"] == paged["predicted_at_budget"]["decode_tok_s"]
    assert main(["plan", src, "--memory", "1MB"]) == 0
    assert "does not run in 1.00 MB of RAM" in capsys.readouterr().out
    assert main(["plan", src]) == 0
    text = capsys.readouterr().out
    assert "fits in RAM" in text and "layout at 4 bits" in text
    assert main(["plan", src, "--memory", "lots"]) == 2
    assert capsys.readouterr().err.strip() == "error: --memory 'lots' is not a size; write it like 2GB, 512MiB or 1.5G"
