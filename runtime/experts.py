"""Where the runtime gets an expert's weights: `ExpertStore.get(layer, expert)`.

`MappedExperts` hands out views into the memory-mapped experts.bin (no copy; the OS pages
them in). A paging store (a fixed pool of slots refilled from the file under a memory budget)
implements the same interface and must give identical results; `weights_in` builds the views
for either, from a buffer holding the expert's run. Either checks an expert's run against its
CRC-32 the first time the expert is used, so a damaged file fails the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MoeError
from .layout import EXPERTS_FILE, Layout, Packed, crc32_each, view_in


@dataclass
class ExpertWeights:
    gate_up: Packed  # [2F, H]: F gate rows, then F up rows
    down: Packed  # [H, F]
    gate_up_bias: np.ndarray | None  # (2F,) f32
    down_bias: np.ndarray | None  # (H,) f32


def weights_in(buf, entries: dict[str, dict], base: int) -> ExpertWeights:
    """Views of one expert's tensors (manifest entries by short name) in buf, whose byte 0 is file offset base.

    Read-only whatever buf is (a slot of the paging pool is writable, the memory map is not): numba compiles a kernel
    once per array type, so every store hands the kernels the one type, and one compilation serves any budget."""
    buf = memoryview(buf).toreadonly()

    def bias(name: str) -> np.ndarray | None:
        return view_in(buf, entries[name], base).codes if name in entries else None

    return ExpertWeights(
        view_in(buf, entries["gate_up"], base),
        view_in(buf, entries["down"], base),
        bias("gate_up_bias"),
        bias("down_bias"),
    )


class ExpertStore:
    """Hands out experts' weights and counts, per layer, cache hits and misses and bytes read from disk."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.wants_prediction = False  # whether prefetch() does anything, so the model can skip predicting
        self.checked = np.zeros((layout.config.num_layers, layout.config.num_experts), bool)  # CRC matched
        self.reset_counters()

    def reset_counters(self) -> None:
        """Per layer: cache hits and misses, bytes read, prefetch hits and prediction accuracy, all zero."""
        n_layers = self.layout.config.num_layers
        self.hits = np.zeros(n_layers, np.int64)
        self.misses = np.zeros(n_layers, np.int64)
        self.bytes_read = np.zeros(n_layers, np.int64)
        self.prefetch_hits = np.zeros(n_layers, np.int64)
        self.predicted = np.zeros(n_layers, np.int64)  # experts predicted for a layer by prefetch
        self.predicted_right = np.zeros(n_layers, np.int64)  # of which its router then chose

    def get(self, layer: int, expert: int) -> ExpertWeights:
        raise NotImplementedError

    def begin_layer(self, layer: int, experts) -> None:
        """The router chose `experts` for `layer`; they are about to be fetched with get()."""

    def prefetch(self, layer: int, experts) -> None:
        """A prediction of the experts `layer` will choose; a paging store starts reading them."""

    def end_token(self, tokens: int = 1) -> None:
        """`tokens` tokens went through every layer."""

    def close(self) -> None:
        """Release files and threads."""

    def _check(self, layer: int, expert: int, crc: int) -> None:
        """The expert's run, whose CRC-32 is crc, matches the manifest (checked from now on), or the file is damaged."""
        if crc != self.layout.expert_record(layer, expert)["crc32"]:
            raise MoeError(f"{self.layout.folder / EXPERTS_FILE}: layer {layer} expert {expert} fails its checksum; "
                           "the file is damaged, run `moe verify` and reconvert", 1)
        self.checked[layer, expert] = True


class MappedExperts(ExpertStore):
    """Every expert straight from the memory map: views built once at load, nothing copied."""

    def __init__(self, layout: Layout):
        super().__init__(layout)
        buf = layout.maps[EXPERTS_FILE]
        self._weights: list[list[ExpertWeights] | None] = [None] * len(self.hits)
        for layer, runs in layout.manifest["experts"].items():
            i = int(layer)
            self._weights[i] = [weights_in(buf, layout.expert_tensors(i, j), 0) for j in range(len(runs))]

    def begin_layer(self, layer: int, experts) -> None:
        """Check the runs of the chosen experts never used before, side by side."""
        new = [e for e in experts if not self.checked[layer, e]]
        for e, crc in zip(new, crc32_each([self.layout.expert_run(layer, e) for e in new]), strict=True):
            self._check(layer, e, crc)

    def get(self, layer: int, expert: int) -> ExpertWeights:
        if not self.checked[layer, expert]:
            self.begin_layer(layer, [expert])
        return self._weights[layer][expert]
