"""`moe bench`: load time, time to first token, prefill and decode speed, peak RSS and expert-cache figures.

Compilation is kept out of the figures: when Numba's disk cache is cold, a first load compiles the
kernels (`compile_s`); the timed load follows, then one short prefill and decode step bring the
kernels and the pages they touch in (`warmup_s`). Each repeat then fills `depth` tokens of context
(untimed, as llama-bench's -d), runs one prefill of `prompt_tokens` seeded random ids and `gen_tokens`
decode steps. Figures are medians over repeats.

What decode is fed (`stream`): `random`, seeded random ids as llama-bench's tg test feeds, so routing
sees fresh tokens each step; or `greedy`, the model's own argmax, which on a random-weight model repeats
one token and makes routing look far stickier (and the expert cache far better) than real text does.

What a generated token reads (`bytes_per_token`, as `moe plan` and `moe info` count it) over the decode time
gives `decode_gb_s`: in RAM, the rate decode streams weights at, to set beside the machine's memory bandwidth.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from . import kernels
from .errors import MoeError
from .home import resolve_model
from .info import bytes_per_token
from .layout import read_layout
from .machine import peak_rss, storage_bytes_read


def expert_counters(stats: dict) -> tuple[int, int, int]:
    """(cache hits, misses, bytes read from disk) over all layers, from Model.stats."""
    return int(stats.get("hits", 0)), int(stats.get("misses", 0)), int(stats.get("bytes_read", 0))


STREAMS = ("random", "greedy")


def bench(path, prompt_tokens: int = 128, gen_tokens: int = 64, memory_budget=None, threads: int | None = None,
          repeat: int = 3, pin=(), stream: str = "random", say=None, depth: int = 0, kv_cache: str = "auto") -> dict:
    """Measure the model at `path` (a folder or converted name); figures as the module says.
    `pin`: (layer, expert) pairs, hottest first, or a profile file, kept resident under a budget, and kv_cache, how
    the KV cache holds keys and values (see load_model);
    `say` is given the timed load's memory notes (model.memory.notes)."""
    from .model import load_model

    if prompt_tokens < 1 or gen_tokens < 1 or repeat < 1 or depth < 0:
        raise MoeError("--prompt-tokens, --gen-tokens and --repeat must each be at least 1, --depth at least 0")
    if stream not in STREAMS:
        raise MoeError(f"--stream {stream!r} is unknown; choose one of {', '.join(STREAMS)}")
    context = depth + prompt_tokens + gen_tokens  # the KV cache sized as llama-bench sizes it: what the run fills
    limit = context_limit(path)
    if context > limit:
        raise MoeError(f"--depth + --prompt-tokens + --gen-tokens = {context} exceeds the model's context of {limit}; "
                       "ask for fewer")
    compile_s = 0.0
    if kernels.cache_is_cold():
        start = time.perf_counter()
        load_model(path, memory_budget=memory_budget, threads=threads, max_context=context, kv_cache=kv_cache).close()
        compile_s = time.perf_counter() - start
    start = time.perf_counter()
    model = load_model(path, memory_budget=memory_budget, threads=threads, max_context=context, pin=pin,
                       kv_cache=kv_cache)
    load_s = time.perf_counter() - start
    if say is not None:
        say(model.memory.notes)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=prompt_tokens, dtype=np.int64)
    filler = rng.integers(0, vocab, size=depth, dtype=np.int64)
    fed = rng.integers(0, vocab, size=gen_tokens, dtype=np.int64) if stream == "random" else None

    start = time.perf_counter()
    model.reset()
    model.forward(ids[: min(prompt_tokens, 8)], last_only=True)  # the prefill kernels (T > 1) ...
    model.forward(ids[:1], last_only=True)  # ... and the decode ones (T = 1)
    warmup_s = time.perf_counter() - start

    runs = [_one_run(model, filler, ids, gen_tokens, fed) for _ in range(repeat)]
    touched = bytes_per_token(model.layout)
    kv = model.kv_cache
    budget = model.memory.budget  # the one asked for, or the one chosen when the model does not fit; None: mapped
    model.close()
    figures = {key: None if any(run[key] is None for run in runs) else statistics.median(run[key] for run in runs)
               for key in runs[0]}
    return {
        "load_s": round(load_s, 4),
        "compile_s": round(compile_s, 4),
        "warmup_s": round(warmup_s, 4),
        "ttft_s": round(figures["ttft_s"], 5),
        "prefill_tok_s": round(prompt_tokens / figures["ttft_s"], 3),
        "decode_tok_s": round(gen_tokens / figures["decode_s"], 3),
        "bytes_per_token": touched,
        "decode_gb_s": round(touched * gen_tokens / figures["decode_s"] / 1e9, 3),
        "peak_rss_bytes": peak_rss(),
        "expert_cache_hit_rate": round(figures["hit_rate"], 5),
        "expert_bytes_read_per_token": round(figures["bytes_per_token"], 1),
        "disk_bytes_read_per_token": None if figures["disk_per_token"] is None else round(figures["disk_per_token"], 1),
        "depth": depth,
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "stream": stream,
        "kv_cache": kv,
        "repeat": repeat,
        "threads": _threads(),
        "memory_budget_bytes": budget,
    }


def context_limit(path) -> int:
    """The longest context of the converted model at `path` (a folder or converted name)."""
    return read_layout(resolve_model(str(path))).config.max_position_embeddings


def _one_run(model, filler: np.ndarray, ids: np.ndarray, gen_tokens: int, fed: np.ndarray | None) -> dict:
    """After `filler` as context, one prefill of `ids`, then `gen_tokens` decode steps fed `fed` (random ids) or,
    when None, the argmax."""
    model.reset()
    if len(filler):
        model.forward(filler, last_only=True)
    hits0, misses0, read0 = expert_counters(model.stats)
    start = time.perf_counter()
    token = int(np.argmax(model.forward(ids, last_only=True)[-1]))
    prefilled = time.perf_counter()
    _, _, read_prefill = expert_counters(model.stats)
    disk_prefill = storage_bytes_read()
    for step in range(gen_tokens):
        logits = model.forward(np.array([token if fed is None else fed[step]], dtype=np.int64), last_only=True)
        token = int(np.argmax(logits[-1]))
    decoded = time.perf_counter()
    disk = storage_bytes_read()
    hits, misses, read = expert_counters(model.stats)
    lookups = (hits - hits0) + (misses - misses0)
    return {
        "ttft_s": prefilled - start,  # the prefill and the first token's choice
        "decode_s": decoded - prefilled,
        "hit_rate": (hits - hits0) / lookups if lookups else 1.0,  # no lookups: every expert mapped, none read
        "bytes_per_token": (read - read_prefill) / gen_tokens,  # during decode: what paging costs per new token
        # during decode, every read from storage: expert misses, and page-cache misses of the mapped files
        "disk_per_token": None if disk is None or disk_prefill is None else (disk - disk_prefill) / gen_tokens,
    }


def _threads() -> int:
    import numba

    return numba.get_num_threads()
