"""`moe profile` and `--pin`: statistics against a slow twin, counts that add up, pinned runs identical."""

import json
from pathlib import Path

import numpy as np
import pytest
from moe.cli import main
from moe.convert import convert
from moe.runtime.errors import MoeError
from moe.runtime.layout import open_layout
from moe.runtime.model import load_model
from moe.runtime.paging import min_budget
from moe.runtime.routing_stats import profile, read_pins, usage
from tiny import make_checkpoint

TEXT = (Path(__file__).parent / "data" / "eval-excerpt.py.txt").read_text()[:6000]  # Python source, shipped


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("prof")
    return convert(str(make_checkpoint("qwen3_moe", root / "src")), root / "out")


def naive(seqs: list[np.ndarray], E: int, window: int) -> dict:
    """The definitions, one token pair and one window at a time."""
    k = seqs[0].shape[1]
    counts = [0] * E
    pairs, any_shared, overlap, distinct = 0, 0, 0, []
    for s in seqs:
        sets = [set(row.tolist()) for row in s]
        for row in sets:
            for e in row:
                counts[e] += 1
        for a, b in zip(sets, sets[1:], strict=False):
            pairs += 1
            any_shared += bool(a & b)
            overlap += len(a & b)
        for i in range(0, len(sets) - window + 1, window):
            distinct.append(len(set().union(*sets[i: i + window])))
    p = np.array(counts) / sum(counts)
    entropy = -sum(x * np.log2(x) for x in p if x > 0)
    return {"counts": counts, "reuse_any": any_shared / pairs, "reuse_overlap": overlap / (pairs * k),
            "distinct": float(np.mean(distinct)), "entropy": entropy}


def test_usage_matches_the_slow_twin():
    rng = np.random.default_rng(1)
    E, k = 8, 3
    seqs = [np.stack([rng.choice(E, k, replace=False, p=np.arange(1, E + 1) / 36) for _ in range(n)])
            for n in (40, 17)]
    got = usage({5: seqs}, E, window=6)
    layer = got["layers"][0]
    want = naive(seqs, E, 6)
    assert layer["layer"] == 5 and layer["tokens"] == 57
    assert layer["counts"] == want["counts"] and sum(layer["counts"]) == 57 * k
    assert layer["reuse_any"] == pytest.approx(want["reuse_any"])
    assert layer["reuse_overlap"] == pytest.approx(want["reuse_overlap"])
    assert layer["distinct_per_window"] == pytest.approx(want["distinct"])
    assert layer["entropy_bits"] == pytest.approx(want["entropy"]) and layer["max_entropy_bits"] == 3.0
    assert sum(layer["share"]) == pytest.approx(k)
    hot = got["hottest"]
    assert len(hot) == E and [layer["counts"][e] for _, e in hot] == sorted(layer["counts"], reverse=True)


def test_counts_add_up_to_tokens_times_top_k(model_path):
    model = load_model(model_path)
    ids = model.tokenizer.encode(TEXT, add_bos=False)[:300]
    p = profile(model, ids, ctx=128, window=32)
    k = model.config.top_k
    assert [layer["layer"] for layer in p["layers"]] == model.config.moe_layers()
    for layer in p["layers"]:
        assert layer["tokens"] == 300 and sum(layer["counts"]) == 300 * k
        assert layer["counts"] == model.stats["layers"][model.config.moe_layers().index(layer["layer"])]["expert_uses"]
    assert len(p["hottest"]) == len(p["layers"]) * model.config.num_experts
    assert p["format"] == "moe-profile" and p["tokens"] == 300 and model.routing_trace is None
    model.close()


def test_pinned_runs_give_the_same_logits(model_path, tmp_path):
    mapped = load_model(model_path)
    ids = np.array(mapped.tokenizer.encode(TEXT, add_bos=False)[:200], np.int64)
    p = profile(mapped, ids.tolist(), ctx=100)
    (tmp_path / "p.json").write_text(json.dumps(p))
    pins = read_pins(tmp_path / "p.json", mapped.config)
    assert pins == [tuple(x) for x in p["hottest"]]
    want = mapped.logits(ids[:40])
    budget = 2 * min_budget(mapped.layout) + 4 * mapped.experts.layout.manifest["experts"]["0"][0]["nbytes"]
    pinned = load_model(model_path, memory_budget=budget, pin=pins)
    resident = {tuple(pinned.experts.key[s]) for s in pinned.experts.pinned}
    assert resident and resident == set(pins[: len(resident)])
    np.testing.assert_array_equal(pinned.logits(ids[:40]), want)
    assert {tuple(pinned.experts.key[s]) for s in pinned.experts.pinned} == resident  # never evicted
    unpinned = load_model(model_path, memory_budget=budget)
    np.testing.assert_array_equal(unpinned.logits(ids[:40]), want)
    for m in (mapped, pinned, unpinned):
        m.close()


def test_bad_profiles_are_one_line(model_path, tmp_path):
    config = open_layout(model_path).config
    with pytest.raises(MoeError, match="no such file; make one with `moe profile MODEL FILE -o nope.json`"):
        read_pins(tmp_path / "nope.json", config)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MoeError, match="not a profile made by `moe profile`"):
        read_pins(tmp_path / "bad.json", config)
    (tmp_path / "other.json").write_text(json.dumps({"hottest": [[0, 99]]}))
    with pytest.raises(MoeError, match="layer 0 expert 99 is not in this model"):
        read_pins(tmp_path / "other.json", config)
    (tmp_path / "dense.json").write_text(json.dumps({"hottest": [[1, 0]]}))  # layer 1 is dense
    with pytest.raises(MoeError, match="layer 1 expert 0 is not in this model"):
        read_pins(tmp_path / "dense.json", config)


def test_cli_profile_then_pin(model_path, tmp_path, capsys):
    text = tmp_path / "work.txt"
    text.write_text(TEXT[:3000])
    out = tmp_path / "profile.json"
    assert main(["profile", str(model_path), str(text), "-o", str(out), "--ctx", "128", "--window", "16"]) == 0
    printed, err = capsys.readouterr()
    assert "entropy" in printed and "hottest" in printed and f"written to {out}" in err
    written = json.loads(out.read_text())
    assert written["window"] == 16 and written["workload"] == str(text)
    assert main(["profile", str(model_path), str(text), "--json", "--max-tokens", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 50

    def ppl(*extra):
        assert main(["perplexity", str(model_path), str(text), "--ctx", "64", "--max-tokens", "200", "--json",
                     *extra]) == 0
        printed, err = capsys.readouterr()
        return json.loads(printed)["perplexity"], err

    plain, _ = ppl()
    assert ppl("--memory-budget", "300kB", "--pin", str(out)) == (plain, "")
    assert ppl("--pin", str(out)) == (plain, f"note: --pin {out} has no effect: every expert is mapped (give a "
                                             "--memory-budget)\n")
    assert main(["run", str(model_path), "def", "--max-tokens", "3", "--pin", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err


def test_pins_fill_at_most_a_quarter_of_the_slots(model_path, tmp_path):
    from moe.runtime.budget import PIN_SHARE, decide
    from moe.runtime.paging import slot_bytes

    pairs = [[0, e] for e in range(8)] + [[2, e] for e in range(8)]
    (tmp_path / "p.json").write_text(json.dumps({"hottest": pairs}))
    layout = open_layout(model_path)
    slot = slot_bytes(layout)
    kept = decide(layout, 20 * slot, pin=tmp_path / "p.json").pins
    assert list(kept) == [tuple(p) for p in pairs[: int(PIN_SHARE * 20)]]
    assert len(read_pins(tmp_path / "p.json", layout.config)) == 16
