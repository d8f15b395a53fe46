"""The `next` expert-cache policy: evict the slot expected to serve the fewest hits per step it stays.

One pool serves every layer, and decode visits the layers in a cycle (0..L-1 for a token, then the
next token), so while layer l computes, an expert of layer m is wanted at the earliest at m's next
visit, d = (m - l - 1) % L + 1 layer steps away, then at d + L, d + 2L, ... p, the chance it is chosen
at that next visit, comes from the routing seen so far: how often a token's successor chose it in that
layer after the experts the layer chose at its last visit (counts of consecutive tokens), smoothed
toward q, its decayed share of recent tokens; later visits choose it with chance q each. A slot's
worth is its expected hits per step of waiting for them, p / d + q * sum over the HORIZON visits after
of 1 / (d + jL): the lowest goes (ties: the least recently used). Why this rule and these constants, measured
on the trained models' routing: tests/bench/README.md.
"""

from __future__ import annotations

import numpy as np

DECAY = 0.9  # per token, of the use counts behind q
PRIOR = 1.0  # weight, in tokens seen, of q in p: the counts of a rarely seen predecessor fall back to q
SMOOTH = 0.1  # a count every expert starts with, so one never seen has q = top_k / E, not 0
HORIZON = 4  # later visits counted in a slot's worth


class NextUse:
    """Per-layer routing statistics and the victim they choose; observe() every layer's choice in order."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int):
        self.k = top_k
        self.uses = np.zeros((n_layers, n_experts))  # decayed count of tokens that chose (layer, expert)
        self.moves = np.zeros((n_layers, n_experts, n_experts), np.float32)  # [l, a, b]: a token chose a, the next b
        self.seen = np.zeros((n_layers, n_experts), np.float32)  # [l, a]: tokens that chose a and had a successor
        self.last: list[np.ndarray | None] = [None] * n_layers  # the experts each layer chose at its last visit
        self.p = np.zeros((n_layers, n_experts))  # chance of being chosen at the layer's next visit
        self.layer = 0  # the layer being computed

    def observe(self, layer: int, experts) -> None:
        """The router chose `experts` for `layer` (every expert of a prefill's tokens, or one token's top-k)."""
        chosen = np.asarray(experts, np.int64)
        self.uses[layer, chosen] += 1.0
        previous = self.last[layer]
        # A prefill's union of experts says nothing about which followed which: learn from single tokens only.
        if previous is not None and len(previous) == len(chosen) == self.k:
            self.moves[layer][np.ix_(previous, chosen)] += 1.0
            self.seen[layer, previous] += 1.0
        self.last[layer] = chosen
        self.layer = layer
        q = self.share()[layer]
        self.p[layer] = ((self.moves[layer, chosen] + PRIOR * q) / (self.seen[layer, chosen, None] + PRIOR)).mean(0)

    def end_token(self, tokens: int = 1) -> None:
        self.uses *= DECAY**tokens

    def share(self) -> np.ndarray:
        """q (L, E): each expert's chance of being chosen by a token, from the decayed counts."""
        smoothed = self.uses + SMOOTH
        return self.k * smoothed / smoothed.sum(axis=1, keepdims=True)

    def victim(self, keys: np.ndarray, last_use: np.ndarray) -> int:
        """Index into keys ((n, 2): layer, expert per candidate slot) of the one to evict."""
        n_layers = len(self.last)
        layers, experts = keys[:, 0], keys[:, 1]
        distance = (layers - self.layer - 1) % n_layers + 1  # (n,) layer steps to the next visit
        q = self.share()[layers, experts]
        later = sum(1.0 / (distance + j * n_layers) for j in range(1, HORIZON + 1))
        worth = self.p[layers, experts] / distance + q * later  # expected hits per step
        return int(np.lexsort((last_use, worth))[0])
