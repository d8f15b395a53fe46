"""--memory-budget is a ceiling: far beyond the model, the pool holds every expert and no more; beyond the
machine's RAM, one clear line."""

from __future__ import annotations

import json

import moe.runtime.paging
import numpy as np
import pytest
from moe.cli import main
from moe.convert import convert
from moe.runtime.errors import MoeError
from moe.runtime.model import load_model
from moe.runtime.paging import slot_bytes
from tiny import make_checkpoint

IDS = np.random.default_rng(5).integers(4, 4096, 20)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    return convert(str(make_checkpoint("mixtral", root / "src", seed=2)), root / "out")


@pytest.mark.parametrize("budget", ["40GB", "1TB", 10**30])
def test_a_budget_beyond_the_model_pages_every_expert_and_no_more(model_path, budget):
    mapped = load_model(model_path)
    want = mapped.logits(IDS)
    model = load_model(model_path, memory_budget=budget)
    store = model.experts
    n_experts = sum(len(runs) for runs in model.layout.manifest["experts"].values())
    assert store.n_slots == n_experts == 8
    assert store.pool.nbytes == n_experts * slot_bytes(model.layout)
    np.testing.assert_array_equal(model.logits(IDS), want)
    assert store.misses.sum() == n_experts - int((store.state == 0).sum())  # each expert read once at most
    for m in (mapped, model):
        m.close()


def test_run_bench_perplexity_under_a_terabyte_budget(model_path, tmp_path, capsys):
    run = ["run", str(model_path), "def", "--max-tokens", "5", "--temperature", "0"]
    assert main(run) == 0
    want = capsys.readouterr().out
    assert main([*run, "--memory-budget", "1TB"]) == 0
    assert capsys.readouterr() == (want, "")
    assert main(["bench", str(model_path), "--memory-budget", "1TB", "--json", "--prompt-tokens", "8",
                 "--gen-tokens", "4", "--repeat", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_budget_bytes"] == 10**12
    # no budget asked and the model fits: mapped, and the JSON says so (an automatic budget would be given)
    assert main(["bench", str(model_path), "--json", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_budget_bytes"] is None
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 20)
    ppl = ["perplexity", str(model_path), str(text), "--ctx", "32", "--json"]
    assert main(ppl) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*ppl, "--memory-budget", "40GB"]) == 0
    assert json.loads(capsys.readouterr().out) == want


def test_a_pool_beyond_available_ram_is_one_line(model_path, monkeypatch, capsys):
    slot = slot_bytes(load_model(model_path).layout)
    monkeypatch.setattr(moe.runtime.paging, "available_ram", lambda: 5 * slot)
    assert load_model(model_path, memory_budget=5 * slot).experts.n_slots == 5  # fits: allowed
    with pytest.raises(MoeError) as e:
        load_model(model_path, memory_budget="1TB")
    assert e.value.exit_code == 2
    assert str(e.value) == (f"memory budget 1.00 TB does not fit in the {5 * slot / 1000:.2f} kB of RAM available "
                            f"(this model's expert cache would take {8 * slot / 1000:.2f} kB); give a smaller "
                            "--memory-budget")
    assert main(["run", str(model_path), "def", "--max-tokens", "2", "--memory-budget", "1TB"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: memory budget 1.00 TB does not fit")


def test_bench_reports_the_budget_it_chose(model_path, monkeypatch, capsys):
    """With no room beside the runtime's reserve, the automatic budget is the smallest one, and bench says which."""
    import moe.runtime.budget
    from moe.runtime.layout import read_layout
    from moe.runtime.paging import min_budget

    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: moe.runtime.budget.RUNTIME_RESERVE)
    assert main(["bench", str(model_path), "--json", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_budget_bytes"] == min_budget(read_layout(model_path))
