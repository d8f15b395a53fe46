"""Predicted decode speed on this machine, from short measurements cached under moe_home().

Decode time per token = fixed cost + weight bytes / kernel rate + expert misses x miss cost:

- the fixed cost (Python, kernel calls, routing) is measured on a miniature of the planned
  model (moe.convert.miniature), its own few weight bytes taken back out;
- weight bytes touched per token (moe.convert.sizes) are read at the rate our matrix-vector kernels
  reach on matrices that do not fit in the CPU caches, per encoding (q4, q8, ...); the plain memory
  bandwidth (numpy sum) is measured beside it for reference;
- under a budget, every expert lookup costs the paging path's bookkeeping, and a miss reads one expert
  run: from the page cache (a copy) when experts.bin fits in the RAM left over, else from disk
  (measured with O_DIRECT on Linux, F_NOCACHE on macOS, else after dropping the file's pages).
  Both costs are measured on the miniature: with a budget holding all its experts (lookups hit) and
  at its minimum (lookups miss).
  Prefetch (on when misses come from disk, as load_model decides) applies each next layer's router
  ahead of time, measured on the miniature too, and reads what it predicts: it turns misses into
  hits but, wrong predictions included, reads PREFETCH_READS times as many experts as the misses it
  would have had; those reads are counted in full, as the CPU they take.

Hit rate under a budget holding a fraction f of all experts (slots / (MoE layers x experts)):
    hit(f) = 1 - (1 - f) ** HIT_EXPONENT
A miss needs the expert to be absent from the cache; with routing independent and uniform that has
probability 1 - f (exponent 1). Real routing reuses experts between neighbouring tokens and favours
some of them, and the frequency policy keeps those: misses fall faster than 1 - f. The exponent and
PREFETCH_READS are fitted on the trained models (tests/bench/README.md: the speed model's constants).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .budget import misses_from_disk
from .errors import MoeError
from .files import load_json
from .home import moe_home
from .kernels import SOURCES_HASH
from .layout import CHUNK, QUANT_BITS, Packed, padded_cols, supers_of
from .machine import drop_cached, open_read, open_uncached, preadv, uncache
from .units import format_size

HIT_EXPONENT = 2.5  # mean of the four trained models' fits
PREFETCH_READS = 1.55  # expert reads with prefetch per miss without it, on the trained models
MACHINE_FILE = "machine.json"
OVERHEAD_FILE = "plan-overheads.json"
VERSION = f"6-{SOURCES_HASH}"  # kernels of other sources run at other speeds: measured again
BANDWIDTH_BYTES = 256 << 20  # numpy sum over this much memory
MATVEC_BYTES = 128 << 20  # weights cycled through per encoding, well beyond the CPU caches
MATRIX_BYTES = 8 << 20  # one matrix of that set: its rows are a layer's, its calls few
DISK_BYTES = 256 << 20  # the temporary file read back for the disk rate
READ_CHUNK = 4 << 20  # expert-run-sized reads
ENCODINGS = ("q4", "q5", "q6", "q8", "bf16", "f16", "f32")
# The clock of every measurement here. Benchmarks on a shared machine may swap in time.process_time
# (single-threaded): CPU seconds leave out the time slices other processes take.
clock = time.perf_counter
MINI_TOKENS = 48  # decoded per timing of the miniature


def hit_rate(fraction: float) -> float:
    """Expected expert-cache hit rate when the budget holds `fraction` of all experts (the formula above)."""
    f = min(max(fraction, 0.0), 1.0)
    return 1.0 - (1.0 - f) ** HIT_EXPONENT


# ---- the machine: bandwidth, kernel rates, read rates


def machine(remeasure: bool = False, say=None) -> dict:
    """This machine's rates (bytes/s) at numba's thread count, measured once per thread count and cached in
    moe_home()/machine.json."""
    import numba

    path = moe_home() / MACHINE_FILE
    threads = numba.get_num_threads()
    cache = _read_json(path)
    if cache.get("version") != VERSION:
        cache = {"version": VERSION}
    if not remeasure and str(threads) in cache:
        return cache[str(threads)]
    if say:
        say("measuring this machine's memory bandwidth, kernel and disk speeds (once; cached)...")
    folder = moe_home()
    folder.mkdir(parents=True, exist_ok=True)
    cached_read, disk_read = read_rates(folder)
    m = {
        "threads": threads,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "memory_bandwidth": memory_bandwidth(),
        "matvec": {enc: matvec_rate(enc) for enc in ENCODINGS},
        "cached_read": cached_read,
        "disk_read": disk_read,
    }
    cache[str(threads)] = m
    _write_json(path, cache)
    return m


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes/s numpy sums a float64 array that no cache holds (best of five)."""
    a = np.ones(nbytes // 8)
    return nbytes / _best(lambda: a.sum(), 5)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def random_packed(encoding: str, shape: tuple[int, ...], group_size: int, rng: np.random.Generator) -> Packed:
    """A tensor of random values in `encoding` (small, so activations stay finite)."""
    if len(shape) == 1 or encoding in ("f32", "bf16", "f16"):
        values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        if encoding == "bf16":
            return Packed("bf16", shape, (values.view(np.uint32) >> 16).astype(np.uint16))
        return Packed(encoding, shape, values.astype(np.float16) if encoding == "f16" else values)
    rows, cols = shape
    cp = padded_cols(cols, group_size)
    groups = cp // group_size
    scales = np.full((rows, groups), 127, np.int8)  # each group's scale 0.01: k = 127, D = 0.01
    supers = np.full((rows, supers_of(groups)), np.float32(0.01).view(np.uint32) >> 16, np.uint16)
    if encoding == "q8":
        return Packed("q8", shape, rng.integers(-8, 8, (rows, cp), dtype=np.int8), scales, group_size, supers)
    return Packed(encoding, shape, rng.integers(0, 256, (rows, cp * QUANT_BITS[encoding] // 8), dtype=np.uint8),
                  scales, group_size, supers)


def matvec_rate(encoding: str, total: int = MATVEC_BYTES, matrix: int = MATRIX_BYTES) -> float:
    """Weight bytes/s our kernels read in decode (one token), cycling through matrices that miss the caches."""
    from .kernels.qmatmul import Scratch, linear

    cols = 4096
    rng = np.random.default_rng(0)
    rows = max(1, matrix // random_packed(encoding, (1, cols), CHUNK, rng).nbytes)  # a row's bytes, scales included
    weights = [random_packed(encoding, (rows, cols), CHUNK, rng) for _ in range(max(1, total // matrix))]
    x = rng.standard_normal((1, cols)).astype(np.float32)
    out = np.zeros((1, rows), np.float32)
    scratch = Scratch()
    linear(weights[0], x, out, scratch)  # compiled, buffers grown

    def sweep():
        for w in weights:
            linear(w, x, out, scratch)

    return sum(w.nbytes for w in weights) / _best(sweep, 5)


def read_rates(folder: Path, nbytes: int = DISK_BYTES) -> tuple[float, float]:
    """(page-cache, disk) read rates in bytes/s, reading a temporary file in `folder` READ_CHUNK at a time.
    The disk first: on macOS the file is written around the page cache (F_NOCACHE), and only reads that
    find nothing cached go to the disk."""
    fd, name = tempfile.mkstemp(prefix=".moe-read-", dir=folder)
    try:
        uncache(fd)
        block = np.random.default_rng(0).integers(0, 256, READ_CHUNK, dtype=np.uint8).tobytes()
        for _ in range(max(1, nbytes // READ_CHUNK)):
            os.write(fd, block)
        os.fsync(fd)
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, READ_CHUNK)  # page-aligned, as O_DIRECT wants
        disk = _disk_rate(name, fd, buf, size)
        reader = open_read(name)  # through the page cache, whatever fd's flags
        try:
            cached = size / _best(lambda: _read_all(reader, buf, size), 2)
        finally:
            os.close(reader)
        buf.close()
        return cached, disk
    finally:
        os.close(fd)
        os.unlink(name)


def _read_all(fd: int, buf, size: int) -> None:
    view = memoryview(buf)
    for offset in range(0, size, READ_CHUNK):
        preadv(fd, [view], offset)


def _disk_rate(name: str, fd: int, buf, size: int) -> float:
    """Bytes/s from the device: an uncached descriptor (machine.open_uncached) where the OS and file system
    allow one, else after dropping the file's pages."""
    uncached = open_uncached(name)
    if uncached is not None:
        try:
            start = time.perf_counter()
            _read_all(uncached, buf, size)
            return size / (time.perf_counter() - start)
        except OSError:
            pass  # O_DIRECT refused by the file system only when read
        finally:
            os.close(uncached)
    drop_cached(fd)
    start = time.perf_counter()
    _read_all(fd, buf, size)
    return size / (time.perf_counter() - start)


# ---- the miniature: fixed cost per token and per miss


def time_miniature(key: dict, write_miniature, remeasure: bool = False, say=None) -> dict:
    """The decode seconds per token with experts mapped of the converted miniature `write_miniature(folder)` writes
    (returning its plan figures), the paging path's seconds per expert lookup and per miss (its read excluded),
    and its bytes touched per token by encoding; cached in moe_home() under `key` and the thread count."""
    import numba

    key = json.dumps({**key, "threads": numba.get_num_threads(), "version": VERSION}, sort_keys=True)
    path = moe_home() / OVERHEAD_FILE
    cache = _read_json(path)
    if not remeasure and key in cache:
        return cache[key]
    rates = machine(say=say)
    if say:
        say("timing a miniature of this model on this machine (once per architecture; cached)...")
    moe_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".moe-mini-", dir=moe_home()) as tmp:
        fig = write_miniature(Path(tmp))
        decode_s = min(_time_decode(Path(tmp), None)[0] for _ in range(3))  # the least disturbed of three
        missing_s, misses, _ = _time_decode(Path(tmp), fig["min_budget_bytes"])
        everything = fig["moe_layers"] * fig["experts"] * fig["slot_bytes"]
        holding_s, held_misses, lookups = _time_decode(Path(tmp), everything, passes=2)
        predicting_s, _, _ = _time_decode(Path(tmp), everything, passes=2, prefetch=True)
    per_miss = (missing_s - decode_s) / max(misses, 1e-9)  # lookup, bookkeeping and read
    lookup_s = (holding_s - decode_s - held_misses * per_miss) / max(lookups - held_misses, 1e-9)
    lookup_s = min(max(0.0, lookup_s), per_miss)
    entry = {
        "decode_s": decode_s,
        "lookup_s": lookup_s,
        "predict_s": max(0.0, predicting_s - holding_s) / fig["moe_layers"],  # per MoE layer
        "miss_s": max(0.0, per_miss - lookup_s - fig["expert_run_bytes"] / rates["cached_read"]),
        "bytes_per_token_by_encoding": fig["bytes_per_token_by_encoding"],
    }
    cache = _read_json(path)
    cache[key] = entry
    _write_json(path, cache)
    return entry


def _time_decode(folder: Path, budget: int | None, passes: int = 1,
                 prefetch: bool = False) -> tuple[float, float, float]:
    """(median seconds per decoded token, expert misses and lookups per token) of the miniature at `folder`,
    over the last of `passes` runs of the same tokens (earlier ones fill the cache), at the thread count the
    measurements are cached for."""
    import numba

    from .model import load_model

    model = load_model(folder, memory_budget=budget, threads=numba.get_num_threads(), max_context=MINI_TOKENS + 8,
                       prefetch=prefetch)
    try:
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, MINI_TOKENS, dtype=np.int64)
        for _ in range(passes):
            model.reset()
            model.forward(ids[:4], last_only=True)
            model.experts.reset_counters()
            times = []
            for i in range(4, MINI_TOKENS):
                start = clock()
                model.forward(ids[i: i + 1], last_only=True)
                times.append(clock() - start)
        misses = int(model.experts.misses.sum()) / len(times)
        lookups = misses + int(model.experts.hits.sum()) / len(times)
    finally:
        model.close()
    return float(np.median(times)), misses, lookups


# ---- the prediction


def predict(fig: dict, rates: dict, mini: dict, budget: int | None = None, available: int | None = None,
            prefetch: bool = True) -> dict:
    """Decode tokens/s for the planned model: experts in RAM (budget None) or paged under `budget` bytes.

    `available`: RAM the OS could give (for where misses come from: page cache or disk).
    """
    seconds = mini["decode_s"]
    for enc, nbytes in fig["bytes_per_token_by_encoding"].items():
        extra = nbytes - mini["bytes_per_token_by_encoding"].get(enc, 0)
        seconds += max(0, extra) / rates["matvec"][enc]
    result = {"decode_tok_s": 1.0 / seconds, "hit_rate": 1.0, "expert_bytes_read_per_token": 0.0}
    if budget is None:
        return result
    if budget < fig["min_budget_bytes"]:
        raise MoeError(f"budget {format_size(budget)} is below the minimum of {format_size(fig['min_budget_bytes'])}")
    slots = budget // fig["slot_bytes"]
    fraction = min(1.0, slots / (fig["moe_layers"] * fig["experts"]))
    hit = hit_rate(fraction)
    lookups = fig["top_k"] * fig["moe_layers"]
    misses = (1.0 - hit) * lookups
    from_cache = not misses_from_disk(fig["experts_bin_bytes"], fig["ram_bytes_at_min_budget"], budget, available or 0)
    rate = rates["cached_read"] if from_cache else rates["disk_read"]
    reads = misses
    # as load_model decides: prefetch when misses come from disk, and with room beyond two layers' top-k
    if prefetch and not from_cache and slots > 2 * fig["top_k"]:
        seconds += fig["moe_layers"] * mini["predict_s"]
        reads = misses * PREFETCH_READS
    seconds += lookups * mini["lookup_s"] + reads * (fig["expert_run_bytes"] / rate + mini["miss_s"])
    return {
        "decode_tok_s": 1.0 / seconds,
        "hit_rate": hit,
        "budget_fraction": fraction,
        "expert_bytes_read_per_token": reads * fig["expert_run_bytes"],
        "misses_from": "page cache" if from_cache else "disk",
    }


def _read_json(path: Path) -> dict:
    try:
        data = load_json(path, "")
    except MoeError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    """Written beside and renamed into place, so a concurrent reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)

