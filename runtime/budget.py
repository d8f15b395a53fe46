"""How a model's experts are held in memory, decided in one place when it loads.

Either straight from the memory map (the model fits in available RAM, or no budget was asked for and it
fits comfortably), or paged into a pool of slots under a budget (paging.py): then whether the next layer's
predicted experts are read ahead, whether expert reads are kept out of the page cache, and which pinned
experts stay resident. The decision carries what the user should be told instead of printing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .layout import EXPERTS_FILE, MODEL_FILE, Layout
from .machine import available_ram
from .paging import min_budget, slot_bytes, slot_count
from .routing_stats import read_pins
from .units import format_size, parse_size

# Pinned experts fill at most this share of the cache's slots: on the trained models at a 25 % budget,
# pinning more lowered the hit rate (the frequency policy keeps hot experts resident anyway).
PIN_SHARE = 0.25
# Beside the pool, model.bin and the KV cache, the process holds ~220 MB on synthetic OLMoE (Python, numpy, numba's
# kernels, buffers); of the room left, the automatic pool takes this share, the rest is slack for the machine.
RUNTIME_RESERVE = 256 * 2**20
POOL_SHARE = 0.9


@dataclass(frozen=True)
class Memory:
    """The decision: experts mapped (budget None) or paged under a budget, and what to say about it."""

    budget: int | None  # bytes the expert cache may hold; None: every expert comes from the memory map
    prefetch: bool | None  # read the next layer's predicted experts while this layer computes: None, while that pays
    uncached: bool  # drop what a miss read from the page cache once it is in its slot
    hold_weights: bool  # model.bin copied into the process's own memory, out of the page cache's reach
    pins: tuple[tuple[int, int], ...]  # (layer, expert) kept resident, hottest first
    notes: tuple[str, ...]  # lines for the user (stderr), in order

    @property
    def paged(self) -> bool:
        return self.budget is not None


def decide(layout: Layout, budget: int | str | None = None, prefetch: bool | None = None, pin=(),
           max_context: int = 0, kv_dtype: np.dtype | None = None) -> Memory:
    """How `layout`'s experts are held. budget: bytes or text such as "2GB"; None chooses one only when the model
    does not fit in available RAM beside the KV cache of max_context positions and the runtime. prefetch: True, False, or None: measured, when misses come from disk.
    pin: (layer, expert) pairs, hottest first, or a profile file (`moe profile -o`) whose hottest pairs are read
    against this model; at most PIN_SHARE of the slots, leaving room for one layer's top-k."""
    sizes = {name: f["size"] for name, f in layout.manifest["files"].items()}
    available = available_ram()
    notes = []
    kv = kv_cache_bytes(layout.config, max_context, layout.kv_cache_dtype() if kv_dtype is None else kv_dtype)
    if budget is None:
        budget = _automatic(layout, sizes, kv, available)
        if budget is not None:
            notes.append(f"moe: the model ({format_size(sum(sizes.values()))}) does not fit in the "
                         f"{format_size(available)} of available RAM beside a {max_context}-token KV cache "
                         f"({format_size(kv)}); paging experts under a budget of {format_size(budget)} (choose one "
                         "with --memory-budget)")
    else:
        budget = parse_size(budget, "memory budget")
    if isinstance(pin, (str, os.PathLike)):
        pins, pins_from = read_pins(pin, layout.config), f"--pin {pin}"
    else:
        pins, pins_from = [(int(layer), int(expert)) for layer, expert in pin], "pin"
    if budget is None:
        if pins:
            notes.append(f"note: {pins_from} has no effect: every expert is mapped (give a --memory-budget)")
        return Memory(None, False, False, False, (), tuple(notes))
    uncached = misses_from_disk(sizes[EXPERTS_FILE], sizes[MODEL_FILE] + kv + RUNTIME_RESERVE, budget, available)
    slots, k = slot_count(layout, budget), layout.config.top_k
    # Prefetch needs room beyond the layer being computed: more than two layers' top-k. By default it is tried
    # only when misses come from disk, and reads ahead only while its predictions are measured to be right.
    if prefetch is None and not uncached or slots <= 2 * k:
        prefetch = False
    kept = min(int(PIN_SHARE * (budget // slot_bytes(layout))), max(0, slots - k))
    # Misses from disk churn the page cache: the weights every token reads must not be what it drops.
    return Memory(budget, prefetch, uncached, uncached, tuple(pins[:kept]), tuple(notes))


def misses_from_disk(experts_bytes: int, resident_bytes: int, budget: int, available: int | None = None) -> bool:
    """Whether experts.bin (experts_bytes) is larger than the page cache can keep beside the pool (budget) and
    the rest of the process (resident_bytes: model.bin, the KV cache, the runtime), out of `available` (default: available_ram()): then a miss
    waits for the disk, and reading the next layer's predicted experts ahead pays; from the page cache a miss is
    a copy cheaper than predicting it (tests/bench/README.md)."""
    available = available_ram() if available is None else available
    pool = min(budget, experts_bytes)  # a larger budget still makes a pool of every expert, no more
    return experts_bytes > available - pool - resident_bytes


def kv_cache_bytes(cfg, context: int, dtype: np.dtype) -> int:
    """Keys and values (or latents) of every attention layer for `context` tokens, as `dtype` (see
    layout.kv_cache_dtype; int8 codes with a float32 scale per row; its pages are committed as positions fill), and
    the f32 recurrent states of the linear attention layers."""
    linear = len(cfg.linear_layers())
    row_scales = cfg.kv_cache_rows * 4 if dtype == np.int8 else 0
    attention = (cfg.num_layers - linear) * (cfg.kv_cache_width * dtype.itemsize + row_scales) * context
    return attention + linear * cfg.recurrent_state_width * 4


def _automatic(layout: Layout, sizes: dict[str, int], kv: int, available: int) -> int | None:
    """None when the whole model fits in available RAM beside the KV cache (kv bytes) and the runtime: the page
    cache then holds it all. Otherwise POOL_SHARE of what is left beside model.bin, the KV cache and the runtime:
    under a budget, misses come around the page cache and model.bin is held in the process, so the pool needs no
    page cache beside it."""
    needed = kv + RUNTIME_RESERVE
    if sum(sizes.values()) + needed <= available:
        return None
    return max(min_budget(layout), int(POOL_SHARE * (available - sizes[MODEL_FILE] - needed)))
