"""Experts paged into a fixed pool of slots under a memory budget.

The pool is allocated once: `budget // slot_bytes` slots (never more than there are experts, and
refused beyond the RAM available), each big enough for the largest expert run. A miss reads the
expert's run from experts.bin into a slot with one positioned read (no mmap residency, so the
budget holds whatever the OS does with its page cache), and checks its CRC-32 the first time
that expert is read. As soon as a layer's router has run, all of that layer's misses are read side
by side (several reads in flight). When experts.bin cannot stay in the page cache beside the pool,
a miss is read from the device straight into its slot, around the page cache (or dropped from it
once read, where the OS cannot read around it), which leaves that memory to the process. Eviction picks, among slots no one is using, the one whose next use is
expected farthest away (`next`, the default: cache_policy.py), the one whose expert has the
lowest decayed use count (`freq`), or the least recently used one (`lru`). With prefetch, a
background thread reads the experts the next layer is predicted to need while this layer
computes: always, or (measured) only while the predictions of experts not in the cache prove right at
least READ_AHEAD_PRECISION of the time (each wrong one is a whole expert read for nothing and the eviction
of one that was wanted) and the device is idle more than READ_AHEAD_IDLE of the time (a busy device only
delays the reads the router asks for); a slot being read is never handed out until its read completed and checked, and a
failed read leaves the slot empty.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .cache_policy import NextUse
from .errors import MoeError
from .experts import ExpertStore, ExpertWeights, weights_in
from .layout import EXPERT_ALIGN, EXPERTS_FILE, Layout, align, crc32
from .machine import (
    anonymous,
    available_ram,
    drop_cached,
    open_read,
    open_uncached,
    preadv,
    read_around_cache,
)
from .units import format_size, format_sizes

POLICIES = ("next", "freq", "lru")
DECAY = 0.98  # per token: an expert's use count halves over ~35 tokens of not being chosen
READ_AHEAD_PRECISION = 2 / 3  # then the bytes read stay within 1.5x of the experts used
READ_AHEAD_IDLE = 0.5  # on synthetic OLMoE under pressure, 80 % busy: reading ahead 82 %-right guesses cost 8 %
BUSY_DECAY = 0.8  # per token: the device's load changes faster than routing habits
READ_AHEAD_EVIDENCE = 32  # predictions of absent experts scored (decayed) before measured read-ahead may start

_EMPTY, _LOADING, _READY = 0, 1, 2
DIRECT_ALIGN = 4096  # O_DIRECT reads: lengths (and offsets, buffers: the runs and slots are aligned wider) in blocks


def slot_bytes(layout: Layout) -> int:
    """Bytes of one slot: the largest expert run, rounded up to the alignment."""
    return max(align(r["nbytes"], EXPERT_ALIGN) for runs in layout.manifest["experts"].values() for r in runs)


def min_budget(layout: Layout) -> int:
    """The smallest workable budget: one layer's top-k experts resident at once."""
    return layout.config.top_k * slot_bytes(layout)


def slot_count(layout: Layout, budget: int) -> int:
    """Slots a budget makes: a budget is a ceiling, so never more slots than there are experts."""
    return min(budget // slot_bytes(layout), sum(len(runs) for runs in layout.manifest["experts"].values()))


def _allocate_pool(n_slots: int, slot_bytes: int, budget: int) -> np.ndarray:
    """The slots' memory, refused when it could not all be resident: filling it would swap, or be killed."""
    available = available_ram()
    if n_slots * slot_bytes <= available:
        try:  # page-aligned, as reads that bypass the page cache need
            return np.frombuffer(anonymous(n_slots * slot_bytes), np.uint8)[: n_slots * slot_bytes].reshape(
                n_slots, slot_bytes)
        except (MemoryError, OSError):
            pass
    raise MoeError(
        f"memory budget {format_size(budget)} does not fit in the {format_size(available)} of RAM available "
        f"(this model's expert cache would take {format_size(n_slots * slot_bytes)}); give a smaller --memory-budget"
    )


class PagedExperts(ExpertStore):
    """An expert cache of a fixed number of slots, filled from experts.bin on demand and by prefetch."""

    def __init__(self, layout: Layout, budget: int, policy: str = "next", prefetch: bool | None = False, pins=(),
                 uncached: bool = False):
        """prefetch (True: always, None: while measured to pay, False: never), uncached and pins (hottest first, as
        many as may stay resident) as budget.decide chose them."""
        super().__init__(layout)
        if policy not in POLICIES:
            raise MoeError(f"cache policy {policy!r} is unknown; choose one of {', '.join(POLICIES)}")
        self.slot_bytes = slot_bytes(layout)
        minimum = min_budget(layout)
        if budget < minimum:
            k, (given, least) = layout.config.top_k, format_sizes(budget, minimum)
            raise MoeError(
                f"memory budget {given} is below this model's minimum of {least} "
                f"({k} experts of {format_size(self.slot_bytes)} for one layer's top-{k}); give at least that"
            )
        self.n_slots = slot_count(layout, budget)
        self.policy = policy
        self.pool = _allocate_pool(self.n_slots, self.slot_bytes, budget)  # pages committed as slots fill
        n_layers, n_experts = layout.config.num_layers, layout.config.num_experts
        self.slot_of = np.full((n_layers, n_experts), -1, np.int64)  # (L, E) -> slot or -1
        self.key = np.full((self.n_slots, 2), -1, np.int64)  # slot -> (layer, expert)
        self.state = np.zeros(self.n_slots, np.int8)
        self.last_use = np.zeros(self.n_slots, np.int64)
        self.freq = np.zeros((n_layers, n_experts), np.float64)
        self._next = NextUse(n_layers, n_experts, layout.config.top_k) if policy == "next" else None
        self.prefetched = np.zeros(self.n_slots, bool)  # filled by prefetch, not used yet
        self.queued = np.zeros(self.n_slots, bool)  # read as its layer's miss (counted then), not used yet
        self._prediction: dict[int, set[int]] = {}
        self._absent: dict[int, set[int]] = {}  # of a layer's prediction, the experts not in the cache then
        self.absent_predicted = 0.0  # decayed counts of those, and of those the router then chose
        self.absent_right = 0.0
        self.device_busy: float | None = None  # decayed share of each token's time with a read in flight
        self._in_flight, self._busy_since, self._busy = 0, 0.0, 0.0
        self._token_start = time.perf_counter()
        self._in_use: set[int] = set()  # the slot whose views get() last handed out
        self._protected: set[int] = set()  # slots of the layer being computed: prefetch must not take them
        self._clock = 0
        self._lock = threading.Lock()
        self._loads: dict[int, Future] = {}
        self._fd = open_read(layout.folder / EXPERTS_FILE)
        # When experts.bin cannot stay in the page cache anyway, a miss is read straight from the device into
        # its slot (O_DIRECT, F_NOCACHE), or else dropped from the page cache once there: cached twice, it would
        # push out the rest of the process instead.
        self._direct = open_uncached(layout.folder / EXPERTS_FILE) if uncached else None
        self._drop_after_read = uncached and self._direct is None and not read_around_cache(self._fd)
        self._runs = {int(k): v for k, v in layout.manifest["experts"].items()}
        self._entries = {(i, j): layout.expert_tensors(i, j) for i, runs in self._runs.items() for j in range(len(runs))}
        self.wants_prediction = prefetch is not False
        self._measured = prefetch is None
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="moe-prefetch") if self.wants_prediction else None
        # A layer's misses are read side by side, several reads in flight, as soon as its router has run.
        self._readers = ThreadPoolExecutor(min(layout.config.top_k, 8), thread_name_prefix="moe-read")
        self.read = preadv  # the one read call; tests replace it to read slowly or fail
        self.pinned: set[int] = set()  # slots of pinned experts: read once, never evicted
        for layer, expert in pins:
            slot = self._claim(layer, expert)
            self._fill(slot, layer, expert)
            self.pinned.add(slot)

    # -- what the model calls ---------------------------------------------------------------

    def begin_layer(self, layer: int, experts) -> None:
        """The router chose `experts` for `layer`: keep their slots from prefetch, score the prediction."""
        chosen = set(experts)
        guess = self._prediction.pop(layer, None)
        if guess is not None:
            self.predicted[layer] += len(guess)
            self.predicted_right[layer] += len(guess & chosen)
            absent = self._absent.pop(layer)
            self.absent_predicted += len(absent)
            self.absent_right += len(absent & chosen)
        with self._lock:
            # the policy learns this layer's choice before it picks the slots this layer's misses go to
            self.freq[layer, list(chosen)] += 1.0
            if self._next is not None:
                self._next.observe(layer, list(chosen))
            self._protected = {int(self.slot_of[layer, e]) for e in chosen if self.slot_of[layer, e] >= 0}
            missing = [e for e in experts if self.slot_of[layer, e] < 0]
            if len(missing) > 1 and len(chosen) <= self.n_slots - len(self.pinned):
                for e in missing:
                    slot = self._claim(layer, e, for_prefetch=True)  # never a slot this layer chose
                    if slot < 0:
                        break  # the rest are read one by one as get() meets them
                    self.misses[layer] += 1
                    self.queued[slot] = True
                    self._protected.add(slot)
                    self._loads[slot] = self._readers.submit(self._fill, slot, layer, e)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights in its slot, read from disk on a miss; valid until the next get()."""
        self._in_use = set()  # the previous expert's views are done with
        while True:
            with self._lock:
                slot = int(self.slot_of[layer, expert])
                pending = self._loads.get(slot) if slot >= 0 else None
                if slot >= 0 and pending is None:
                    if self.queued[slot]:
                        self.queued[slot] = False  # its miss was counted when begin_layer queued the read
                    else:
                        self.hits[layer] += 1
                    if self.prefetched[slot]:
                        self.prefetch_hits[layer] += 1
                        self.prefetched[slot] = False
                    self._hold(slot)
                    break
                if slot < 0:
                    slot = self._claim(layer, expert)
                    if slot < 0:  # every slot is being filled by prefetch: wait for one
                        pending = next(iter(self._loads.values()))
                    else:
                        self.misses[layer] += 1
                        self._hold(slot)
            if pending is not None:
                try:
                    pending.result()  # wait for the read in flight; if it failed, its slot is empty again
                except Exception:
                    pass
                continue
            self._fill(slot, layer, expert)
            break
        return weights_in(self.pool[slot], self._entries[(layer, expert)], self._runs[layer][expert]["offset"])

    def end_token(self, tokens: int = 1) -> None:
        """`tokens` tokens went through every layer: age the use counts."""
        self.freq *= DECAY**tokens
        if self._next is not None:
            self._next.end_token(tokens)
        self.absent_predicted *= DECAY**tokens
        self.absent_right *= DECAY**tokens
        now = time.perf_counter()
        with self._lock:
            busy = self._busy + (now - self._busy_since if self._in_flight else 0.0)
            self._busy, self._busy_since = 0.0, now
        share = min(1.0, busy / max(now - self._token_start, 1e-9))
        self._token_start = now
        if self.device_busy is None:
            self.device_busy = share
        else:
            kept = BUSY_DECAY**tokens
            self.device_busy = kept * self.device_busy + (1 - kept) * share

    @property
    def reading_ahead(self) -> bool:
        """Whether prefetch reads predictions now: always, or while they are measured to pay."""
        if self._prefetcher is None:
            return False
        if not self._measured:
            return True
        return (self.absent_predicted >= READ_AHEAD_EVIDENCE
                and self.absent_right >= READ_AHEAD_PRECISION * self.absent_predicted
                and self.device_busy is not None and self.device_busy < 1 - READ_AHEAD_IDLE)

    def prefetch(self, layer: int, experts) -> None:
        """Start reading `experts` of `layer` (a prediction) in the background, into slots no one needs now."""
        self._prediction[layer] = set(experts)
        with self._lock:
            absent = [e for e in experts if self.slot_of[layer, e] < 0]
            self._absent[layer] = set(absent)
            if not self.reading_ahead:
                return
            for e in absent:
                slot = self._claim(layer, e, for_prefetch=True)
                if slot < 0:
                    return
                self.prefetched[slot] = True
                self._loads[slot] = self._prefetcher.submit(self._fill, slot, layer, e)

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        for fd in (self._fd, self._direct):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = self._direct = -1

    @property
    def bytes_resident(self) -> int:
        return int((self.state != _EMPTY).sum()) * self.slot_bytes

    # -- inside ----------------------------------------------------------------------------

    def _hold(self, slot: int) -> None:
        """Under the lock: the slot the caller is about to use; prefetch keeps its hands off it."""
        self._clock += 1
        self.last_use[slot] = self._clock
        self._in_use = {slot}
        self._protected.add(slot)

    def _claim(self, layer: int, expert: int, for_prefetch: bool = False) -> int:
        """Under the lock: a slot for (layer, expert), marked loading; -1 if prefetch finds none it may take."""
        busy = self._in_use | self.pinned | set(self._loads)
        if for_prefetch:
            busy |= self._protected
        free = np.flatnonzero(self.state == _EMPTY)
        free = [s for s in free.tolist() if s not in busy]
        if free:
            slot = free[0]
        else:
            # Experts this layer already used go last: a prefill may need more of them than fit.
            candidates = [s for s in range(self.n_slots) if s not in busy and s not in self._protected]
            if not candidates and not for_prefetch:
                candidates = [s for s in range(self.n_slots) if s not in busy]
            if not candidates:
                return -1
            candidates = np.array(candidates, np.int64)
            slot = int(candidates[self._victim(candidates)])
            old_layer, old_expert = self.key[slot]
            self.slot_of[old_layer, old_expert] = -1
        self.key[slot] = (layer, expert)
        self.slot_of[layer, expert] = slot
        self.state[slot] = _LOADING
        self.prefetched[slot] = False
        self.queued[slot] = False
        return slot

    def _victim(self, candidates: np.ndarray) -> int:
        if self._next is not None:
            return self._next.victim(self.key[candidates], self.last_use[candidates])
        if self.policy == "lru":
            return int(np.argmin(self.last_use[candidates]))
        keys = self.key[candidates]
        scores = self.freq[keys[:, 0], keys[:, 1]]
        return int(np.lexsort((self.last_use[candidates], scores))[0])

    @contextmanager
    def _device_in_use(self):
        """Around a read: the time with at least one read in flight adds up to the device's busy time."""
        with self._lock:
            if not self._in_flight:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                if not self._in_flight:
                    self._busy += time.perf_counter() - self._busy_since

    def _fill(self, slot: int, layer: int, expert: int) -> None:
        """Read the run into the slot and check it; on any failure the slot goes back to empty."""
        run = self._runs[layer][expert]
        n = run["nbytes"]
        fd, want = (self._fd, n) if self._direct is None else (self._direct, align(n, DIRECT_ALIGN))
        view = memoryview(self.pool[slot])[:want]
        try:
            with self._device_in_use():
                got = 0
                while got < n:
                    r = self.read(fd, [view[got:]], run["offset"] + got)
                    if r <= 0:
                        raise OSError(f"unexpected end of file after {got} of {n} bytes")
                    got += r
                    fd = self._fd  # a direct read cut short ends with an ordinary one, which takes any offset
            if not self.checked[layer, expert]:
                self._check(layer, expert, crc32(view[:n]))
            if self._drop_after_read:
                drop_cached(self._fd, run["offset"], n)
        except BaseException as exc:
            with self._lock:
                self.slot_of[layer, expert] = -1
                self.key[slot] = (-1, -1)
                self.state[slot] = _EMPTY
                self._loads.pop(slot, None)
            if isinstance(exc, MoeError):
                raise
            if isinstance(exc, OSError):
                raise MoeError(
                    f"{self.layout.folder / EXPERTS_FILE}: reading layer {layer} expert {expert} failed ({exc})", 1
                ) from exc
            raise
        with self._lock:
            self.bytes_read[layer] += n
            self.state[slot] = _READY
            self._loads.pop(slot, None)
