"""Expert paging: the same logits bit for bit under any budget, and never a stale or half-read expert."""

from __future__ import annotations

import os
import shutil
import threading
import time

import moe.runtime.budget
import moe.runtime.layout
import moe.runtime.paging
import numpy as np
import pytest
from moe.convert import convert
from moe.runtime.cache_policy import NextUse
from moe.runtime.errors import MoeError
from moe.runtime.layout import MODEL_FILE
from moe.runtime.model import load_model
from moe.runtime.paging import POLICIES, PagedExperts, min_budget, slot_bytes
from tiny import MODELS, make_checkpoint

ARCHS = MODELS
IDS = np.random.default_rng(0).integers(4, 4096, 24)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every architecture converted to 4 bits once for this module."""
    root = tmp_path_factory.mktemp("paging")
    out = {}
    for arch in ARCHS:
        src = make_checkpoint(arch, root / f"{arch}-hf", seed=3)
        out[arch] = convert(str(src), root / f"{arch}-q4", bits=4)
    return out


def _decode_logits(model, ids):
    """Prefill half the ids, then decode the rest one at a time; every step's logits."""
    model.reset()
    rows = [model.forward(ids[:12])]
    rows += [model.forward(ids[i: i + 1]).copy() for i in range(12, len(ids))]
    return np.concatenate(rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_identical_under_every_budget(converted, arch, monkeypatch):
    path = converted[arch]
    mapped = load_model(path)
    want = _decode_logits(mapped, IDS)
    smallest = min_budget(mapped.layout)
    one = slot_bytes(mapped.layout)
    for budget in (smallest, smallest + one, 3 * smallest, 10**9):
        for policy in POLICIES:
            model = load_model(path, memory_budget=budget, cache_policy=policy)
            got = _decode_logits(model, IDS)
            assert np.array_equal(got, want), (arch, budget, policy)
            s = model.stats
            assert s["misses"] > 0 and s["bytes_read"] > 0
            model.close()
    # misses from disk: read around the page cache, model.bin held in the process, prefetch measured
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: 3 * smallest)
    model = load_model(path, memory_budget=3 * smallest)
    assert model.memory.uncached and model.memory.hold_weights and model.memory.prefetch is None
    assert np.array_equal(_decode_logits(model, IDS), want), arch
    model.close()


def test_every_store_hands_the_kernels_read_only_arrays(converted):
    """Mapped and paged experts are one array type to numba, so one compiled kernel serves both."""
    path = converted["olmoe"]
    for model in (load_model(path), load_model(path, memory_budget=min_budget(load_model(path).layout))):
        w = model.experts.get(0, 0)
        arrays = [w.gate_up.codes, w.gate_up.scales, w.gate_up.supers, w.down.codes, w.down.scales, w.down.supers]
        assert not any(a.flags.writeable for a in arrays), type(model.experts).__name__
        model.close()


def test_budget_below_minimum_names_it(converted):
    path = converted["olmoe"]
    model = load_model(path)
    smallest = min_budget(model.layout)
    with pytest.raises(MoeError, match="minimum of"):
        load_model(path, memory_budget=smallest - 1)


def test_counts_hits_misses_and_bytes(converted):
    path = converted["qwen3_moe"]
    layout = load_model(path).layout
    model = load_model(path, memory_budget=4 * slot_bytes(layout))
    _decode_logits(model, IDS)
    store = model.experts
    s = model.stats
    assert s["hits"] > 0 and s["misses"] > 0
    assert s["bytes_read"] == int(store.bytes_read.sum())
    for layer, runs in layout.manifest["experts"].items():
        nbytes = {r["nbytes"] for r in runs}
        assert len(nbytes) == 1
        assert store.bytes_read[int(layer)] == store.misses[int(layer)] * nbytes.pop()
    assert store.bytes_resident <= store.n_slots * store.slot_bytes <= 4 * slot_bytes(layout)


def test_prefetch_is_counted_and_identical(converted):
    path = converted["gpt_oss"]
    want = _decode_logits(load_model(path), IDS)
    model = load_model(path, memory_budget=6 * slot_bytes(load_model(path).layout), prefetch=True)
    assert model.experts._prefetcher is not None, "prefetch should run when the pool holds more than two layers' top-k"
    got = _decode_logits(model, IDS)
    assert np.array_equal(got, want)
    store = model.experts
    assert store.predicted.sum() > 0
    assert 0 <= store.predicted_right.sum() <= store.predicted.sum()


def test_prefetch_by_default_only_when_misses_come_from_disk(converted, monkeypatch):
    path = converted["gpt_oss"]
    budget = 6 * slot_bytes(load_model(path).layout)
    assert load_model(path, memory_budget=budget).experts._prefetcher is None  # experts.bin stays in the page cache
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: budget)  # no room left beside the pool
    assert load_model(path, memory_budget=budget).experts._prefetcher is not None


def test_misses_from_disk_are_read_around_the_page_cache(converted, monkeypatch, tmp_path):
    """When experts.bin cannot stay in the page cache beside the pool, misses are read from the device straight
    into their slots (O_DIRECT here, page-aligned whole blocks): the same logits."""
    path = converted["gpt_oss"]
    want = _decode_logits(load_model(path), IDS)
    budget = 6 * slot_bytes(load_model(path).layout)
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: budget)  # no room left beside the pool
    opened = []
    real_open = moe.runtime.paging.open_uncached
    monkeypatch.setattr(moe.runtime.paging, "open_uncached", lambda p: opened.append(real_open(p)) or opened[-1])
    model = load_model(path, memory_budget=budget)
    if opened[-1] is None:
        pytest.skip(f"the file system under {path} refuses O_DIRECT")
    reads = []
    real_read = model.experts.read
    model.experts.read = lambda fd, buffers, offset: reads.append((fd, len(buffers[0]), offset)) or real_read(
        fd, buffers, offset)
    assert np.array_equal(_decode_logits(model, IDS), want)
    assert reads and all(fd == opened[-1] and n % 4096 == 0 and offset % 4096 == 0 for fd, n, offset in reads)


def test_misses_from_disk_leave_the_page_cache_to_the_rest(converted, monkeypatch):
    """Where the OS cannot read around the page cache, each expert read is dropped from it once in its slot
    (cached twice, it would push out the rest of the process); when experts.bin fits, the page cache keeps it."""
    path = converted["gpt_oss"]
    want = _decode_logits(load_model(path), IDS)
    budget = 6 * slot_bytes(load_model(path).layout)
    dropped = []
    monkeypatch.setattr(moe.runtime.paging, "drop_cached", lambda fd, offset, n: dropped.append((offset, n)))
    monkeypatch.setattr(moe.runtime.paging, "open_uncached", lambda p: None)
    model = load_model(path, memory_budget=budget)
    assert np.array_equal(_decode_logits(model, IDS), want) and dropped == []
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: budget)  # no room left beside the pool
    model = load_model(path, memory_budget=budget)
    assert np.array_equal(_decode_logits(model, IDS), want)
    runs = {(r["offset"], r["nbytes"]) for runs in model.layout.manifest["experts"].values() for r in runs}
    assert dropped and set(dropped) <= runs and sum(n for _, n in dropped) == model.experts.bytes_read.sum()


def test_misses_from_disk_hold_the_weights_out_of_the_page_cache(converted, monkeypatch, tmp_path):
    """When expert reads churn the page cache, model.bin is copied into the process's own memory: the same logits,
    and nothing read through the file any more (overwriting it changes nothing)."""
    src = converted["qwen3_moe"]
    path = tmp_path / "copy"
    shutil.copytree(src, path)
    want = _decode_logits(load_model(path), IDS)
    budget = 6 * slot_bytes(load_model(path).layout)
    assert not load_model(path, memory_budget=budget).memory.hold_weights  # model.bin stays in the page cache
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: budget)  # no room left beside the pool
    model = load_model(path, memory_budget=budget)
    assert model.memory.hold_weights
    size = (path / MODEL_FILE).stat().st_size
    with open(path / MODEL_FILE, "r+b") as f:
        f.write(bytes(size))
    assert np.array_equal(_decode_logits(model, IDS), want)


def test_weights_file_ending_early_while_held_is_an_error(converted, monkeypatch, tmp_path):
    path = tmp_path / "copy"
    shutil.copytree(converted["qwen3_moe"], path)
    budget = 6 * slot_bytes(load_model(path).layout)
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: budget)
    monkeypatch.setattr(moe.runtime.layout, "preadv", lambda fd, buffers, offset: 0)
    with pytest.raises(MoeError, match=r"model\.bin: the file ended after 0 of \d+ bytes"):
        load_model(path, memory_budget=budget)


def test_slow_reads_never_serve_half_an_expert(converted):
    """Reads that arrive in small pieces, slowly, while prefetch runs: still identical logits."""
    path = converted["olmoe"]
    want = _decode_logits(load_model(path), IDS)
    model = load_model(path, memory_budget=7 * slot_bytes(load_model(path).layout), prefetch=True)

    def slow_read(fd, buffers, offset):
        time.sleep(0.0005)
        piece = [buffers[0][:4096]]
        return os.preadv(fd, piece, offset)

    model.experts.read = slow_read
    assert np.array_equal(_decode_logits(model, IDS), want)


def test_failed_read_is_an_error_and_leaves_no_half_expert(converted):
    path = converted["mixtral"]
    model = load_model(path, memory_budget=min_budget(load_model(path).layout))
    calls = {"n": 0}
    lock = threading.Lock()

    def failing_read(fd, buffers, offset):
        with lock:
            calls["n"] += 1
            if calls["n"] == 3:
                buffers[0][:16] = b"\xff" * 16  # half a read landed, then the disk failed
                raise OSError(5, "Input/output error")
        return os.preadv(fd, buffers, offset)

    model.experts.read = failing_read
    with pytest.raises(MoeError, match=r"reading layer \d+ expert \d+ failed"):
        _decode_logits(model, IDS)
    store = model.experts
    assert not (store.state == 1).any(), "no slot may stay half-read"
    model.experts.read = os.preadv
    want = _decode_logits(load_model(path), IDS)
    assert np.array_equal(_decode_logits(model, IDS), want)


def test_a_layers_misses_are_read_side_by_side_and_a_failed_one_never_serves(converted):
    """Decode reads a layer's misses in parallel (several reads in flight): a read there that fails half-way is
    read again when the expert is needed (a transient error costs nothing), one that keeps failing is an error,
    and no slot is ever used half-read."""
    path = converted["mixtral"]
    want = _decode_logits(load_model(path), IDS)
    model = load_model(path, memory_budget=2 * min_budget(load_model(path).layout))
    in_flight, most, failed = [0], [0], []
    lock = threading.Lock()

    def read(fd, buffers, offset, fail_offsets=()):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.002)  # slow enough that the layer's reads overlap
            if threading.current_thread().name.startswith("moe-read") and offset in fail_offsets:
                failed.append(offset)
                buffers[0][:16] = b"\xff" * 16
                return 0  # a short read: the file seems to end mid-expert
            return os.preadv(fd, buffers, offset)
        finally:
            with lock:
                in_flight[0] -= 1

    first = model.experts._runs[0][1]["offset"]
    model.experts.read = lambda fd, buffers, offset: read(fd, buffers, offset, {first})
    assert np.array_equal(_decode_logits(model, IDS), want)
    assert most[0] >= 2, "a layer's misses should be read side by side"
    assert failed, "the failing read should have been queued"

    model = load_model(path, memory_budget=2 * min_budget(load_model(path).layout))
    model.experts.read = lambda fd, buffers, offset: (_ for _ in ()).throw(OSError(5, "Input/output error")) \
        if offset == first else read(fd, buffers, offset)
    with pytest.raises(MoeError, match=r"reading layer 0 expert 1 failed"):
        _decode_logits(model, IDS)
    model.close()  # the layer's other reads, still in flight when the error came, land
    assert not (model.experts.state == 1).any(), "no slot may stay half-read"


def test_damaged_expert_fails_its_checksum_on_first_read(converted, tmp_path):
    import shutil

    path = tmp_path / "damaged"
    shutil.copytree(converted["mixtral"], path)
    model = load_model(path)
    run = model.layout.manifest["experts"]["0"][1]
    model.close()
    with open(path / "experts.bin", "r+b") as f:
        f.seek(run["offset"] + 10)
        byte = f.read(1)
        f.seek(run["offset"] + 10)
        f.write(bytes([byte[0] ^ 0xFF]))
    model = load_model(path, memory_budget=10**9)
    with pytest.raises(MoeError, match="layer 0 expert 1 fails its checksum"):
        for _ in range(20):
            model.logits(np.arange(4, 40))


def test_paged_store_rejects_unknown_policy(converted):
    model = load_model(converted["mixtral"])
    with pytest.raises(MoeError, match="policy"):
        PagedExperts(model.layout, 10**9, policy="random")


@pytest.mark.parametrize("policy, hit_rate", [("next", 0.5), ("freq", 0.0), ("lru", 0.0)])
def test_next_policy_learns_which_expert_follows(converted, policy, hit_rate):
    """One layer whose tokens choose experts 0, 1, 2, 0, 1, 2, ... with two slots: LRU and freq evict the
    expert needed next and miss every time; `next` learns that 0 follows 2 and evicts the one needed later,
    as Belady would: the third expert's slot then alternates and every other lookup hits."""
    layout = load_model(converted["llama4"]).layout
    layer = int(min(layout.manifest["experts"], key=int))
    store = PagedExperts(layout, 2 * slot_bytes(layout), policy, prefetch=False)
    for t in range(60):
        if t == 30:
            store.reset_counters()
        missed = store.misses.sum()
        store.begin_layer(layer, [t % 3])
        store.get(layer, t % 3)
        store.end_token()
        if policy == "next" and t >= 30 and store.misses.sum() > missed:  # kept the one the next token uses
            assert {e for _, e in store.key.tolist()} == {t % 3, (t + 1) % 3}, t
    assert store.hits.sum() / 30 == hit_rate
    store.close()


def test_next_policy_evicts_the_layer_needed_last():
    """Two experts no token chose, one in each layer of a two-layer model: the one whose layer comes
    back last goes (layer 1's while layer 1 computes, as the next token starts at layer 0), whatever LRU says."""
    policy = NextUse(n_layers=2, n_experts=2, top_k=1)
    for _ in range(10):
        policy.observe(0, [0])
        policy.observe(1, [0])
        policy.end_token()
    candidates = np.array([[0, 1], [1, 1]])
    policy.observe(0, [0])
    assert policy.victim(candidates, last_use=np.array([2, 1])) == 0
    assert policy.victim(candidates[::-1], last_use=np.array([1, 2])) == 1
    policy.observe(1, [0])
    assert policy.victim(candidates, last_use=np.array([1, 2])) == 1
    assert policy.victim(candidates[::-1], last_use=np.array([2, 1])) == 0


@pytest.mark.parametrize("right, device", [(True, "idle"), (False, "idle"), (True, "busy")])
def test_measured_prefetch_reads_ahead_only_while_right_and_the_device_is_idle(converted, right, device):
    """Measured prefetch scores each prediction of experts not in the cache against the router's choice and reads
    ahead only while at least READ_AHEAD_PRECISION of them prove right and the device is idle more than
    READ_AHEAD_IDLE of the time: predictions always right, with compute (a sleep) between slow reads, start reading
    ahead and then serve hits; always wrong, or with reads taking all the time, it never reads ahead."""
    layout = load_model(converted["gpt_oss"]).layout
    layers = sorted(int(i) for i in layout.manifest["experts"])
    n = layout.config.num_experts
    store = PagedExperts(layout, 4 * slot_bytes(layout), prefetch=None)
    real_read = store.read
    store.read = lambda fd, buffers, offset: time.sleep(0.002) or real_read(fd, buffers, offset)
    rng = np.random.default_rng(0)
    read_ahead = []
    for _ in range(40):
        for layer in layers:
            chosen = int(rng.integers(n))
            store.prefetch(layer, [chosen if right else (chosen + 1) % n])
            read_ahead.append(store.reading_ahead)
            store.begin_layer(layer, [chosen])
            store.get(layer, chosen)
            if device == "idle":
                time.sleep(0.01)  # the layer's compute
        store.end_token()
    for pending in list(store._loads.values()):
        pending.result()
    if device == "busy":
        assert not any(read_ahead) and store.device_busy > 0.5
    elif right:
        assert read_ahead[0] is False and read_ahead[-1] is True and store.prefetch_hits.sum() > 0
    else:
        assert not any(read_ahead)
        sizes = {r["nbytes"] for runs in layout.manifest["experts"].values() for r in runs}
        assert len(sizes) == 1 and store.bytes_read.sum() == store.misses.sum() * sizes.pop()  # one read per miss
    store.close()


def test_automatic_budget_leaves_room_for_the_weights_the_kv_cache_and_the_runtime(converted, monkeypatch):
    """No budget given: every expert mapped when the whole model fits in available RAM beside the KV cache of the
    context and the runtime; else a pool that fits beside model.bin (held in the process), that KV cache and the
    runtime, smaller for a longer context, and never below the minimum."""
    path = converted["qwen3_moe"]
    layout = load_model(path).layout
    files = {name: f["size"] for name, f in layout.manifest["files"].items()}
    kv = moe.runtime.budget.kv_cache_bytes(layout.config, 64, layout.kv_cache_dtype())
    assert kv == layout.config.num_layers * 64 * layout.config.kv_cache_width * 2  # bfloat16: a 4-bit model
    fits = sum(files.values()) + kv + moe.runtime.budget.RUNTIME_RESERVE
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: fits)
    assert not load_model(path, max_context=64).memory.paged
    available = fits - files["experts.bin"] // 2
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: available)
    model = load_model(path, max_context=64)
    budget = model.memory.budget
    assert budget + files[MODEL_FILE] + kv + moe.runtime.budget.RUNTIME_RESERVE <= available
    assert budget > files["experts.bin"] // 4 and model.memory.hold_weights
    assert "paging experts under a budget of" in model.memory.notes[0]
    assert load_model(path, max_context=128).memory.budget < budget
    monkeypatch.setattr(moe.runtime.budget, "available_ram", lambda: 1)
    assert load_model(path, max_context=64).memory.budget == min_budget(layout)
