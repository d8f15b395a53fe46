"""Every expert and tensor is checked against its CRC-32 the first time it is used, in mapped and paged mode
alike: a damaged file is one line naming the layer and expert (or tensor), exit 1, never silently other text."""

from __future__ import annotations

import re
import shutil

import moe.runtime.experts
import numpy as np
import pytest
from moe.cli import main
from moe.convert import convert
from moe.runtime.errors import MoeError
from moe.runtime.layout import EXPERTS_FILE, MODEL_FILE, open_layout
from moe.runtime.model import load_model
from moe.runtime.paging import min_budget
from tiny import make_checkpoint

IDS = np.random.default_rng(7).integers(4, 4096, 32)
MODES = {"mapped": None, "paged": "min"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("checksums")
    return convert(str(make_checkpoint("mixtral", root / "src", seed=4)), root / "out")


def _damaged(model_path, tmp_path, fname: str, offset: int, n: int = 64):
    """A copy of the model with n bytes at offset of fname inverted."""
    folder = shutil.copytree(model_path, tmp_path / "damaged")
    with open(folder / fname, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
    return folder


def _load(folder, mode: str):
    budget = None if MODES[mode] is None else min_budget(open_layout(folder))
    return load_model(folder, memory_budget=budget)


def _used_expert(model_path) -> tuple[int, int]:
    """(layer, expert) of an expert the IDS route to in the last MoE layer."""
    model = load_model(model_path)
    model.routing_trace = []
    model.logits(IDS)
    layer, idx, _ = model.routing_trace[-1]
    return layer, int(idx[-1, 0])


@pytest.mark.parametrize("mode", MODES)
def test_a_damaged_expert_fails_when_first_used_naming_it(model_path, tmp_path, mode):
    layer, expert = _used_expert(model_path)
    run = open_layout(model_path).expert_record(layer, expert)
    folder = _damaged(model_path, tmp_path, EXPERTS_FILE, run["offset"] + 64)
    model = _load(folder, mode)
    with pytest.raises(MoeError) as e:
        model.logits(IDS)
    assert e.value.exit_code == 1
    assert str(e.value) == (f"{folder / EXPERTS_FILE}: layer {layer} expert {expert} fails its checksum; "
                            "the file is damaged, run `moe verify` and reconvert")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("part, key", [("", "offset"), (" scales", "scales_offset")])
def test_a_damaged_tensor_fails_at_load_naming_it(model_path, tmp_path, mode, part, key):
    entry = open_layout(model_path).entry("layers.1.attn.qkv")
    folder = _damaged(model_path, tmp_path, MODEL_FILE, entry[key] + 8, 8)
    with pytest.raises(MoeError) as e:
        _load(folder, mode)
    assert e.value.exit_code == 1
    assert str(e.value) == (f"{folder / MODEL_FILE}: tensor layers.1.attn.qkv{part} fails its checksum; "
                            "the file is damaged, run `moe verify` and reconvert")


def test_each_expert_is_checked_once_and_results_are_unchanged(model_path, monkeypatch):
    want = load_model(model_path, memory_budget="1GB").logits(IDS)
    model = load_model(model_path)
    store = model.experts
    store.checked[:] = False  # as if its warm-up (on a cold kernel cache) had not run
    checked = []
    crc32_each = moe.runtime.experts.crc32_each
    monkeypatch.setattr(moe.runtime.experts, "crc32_each", lambda bufs: checked.extend(bufs) or crc32_each(bufs))
    np.testing.assert_array_equal(model.logits(IDS), want)
    np.testing.assert_array_equal(model.logits(IDS), want)
    used = {(row["layer"], e) for row in model.stats["layers"] for e, n in enumerate(row["expert_uses"]) if n}
    assert set(zip(*np.nonzero(store.checked), strict=True)) == used and len(checked) == len(used)


def test_cli_run_on_a_damaged_expert_is_one_line(model_path, tmp_path, capsys):
    folder = shutil.copytree(model_path, tmp_path / "all-damaged")
    layout = open_layout(folder)
    runs = [layout.expert_record(0, e) for e in range(layout.config.num_experts)]
    layout.close()
    with open(folder / EXPERTS_FILE, "r+b") as f:
        for run in runs:  # whichever expert the prompt picks first
            f.seek(run["offset"] + 64)
            f.write(bytes(64))
    assert main(["run", str(folder), "def", "--max-tokens", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(rf"error: {re.escape(str(folder / EXPERTS_FILE))}: layer 0 expert [0-3] fails its checksum; "
                        r"the file is damaged, run `moe verify` and reconvert\n", err)
