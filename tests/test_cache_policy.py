"""The `next` cache policy on synthetic routing whose structure is known, replayed without a model."""

from __future__ import annotations

import numpy as np
from moe.runtime.cache_policy import NextUse

N_LAYERS, N_EXPERTS, TOP_K = 3, 8, 2


def markov_trace(tokens: int, seed: int = 0) -> np.ndarray:
    """(T, L, k) choices: each layer's pair usually follows a fixed successor of the previous token's
    pair (a permutation of the experts, per layer), sometimes a random pair: routing that history foretells."""
    rng = np.random.default_rng(seed)
    successor = np.stack([rng.permutation(N_EXPERTS) for _ in range(N_LAYERS)])  # (L, E)
    chosen = np.zeros((tokens, N_LAYERS, TOP_K), np.int64)
    chosen[0] = [rng.choice(N_EXPERTS, TOP_K, replace=False) for _ in range(N_LAYERS)]
    for t in range(1, tokens):
        for layer in range(N_LAYERS):
            follows = successor[layer, chosen[t - 1, layer]]
            chosen[t, layer] = follows if rng.random() < 0.8 else rng.choice(N_EXPERTS, TOP_K, replace=False)
    return chosen


class Lru:
    def observe(self, layer, experts):
        pass

    def end_token(self):
        pass

    def victim(self, keys, last_use):
        return int(np.argmin(last_use))


class DecayedFrequency(Lru):
    """paging's `freq`: the lowest decayed use count goes."""

    def __init__(self):
        self.uses = np.zeros((N_LAYERS, N_EXPERTS))

    def observe(self, layer, experts):
        self.uses[layer, experts] += 1.0

    def end_token(self):
        self.uses *= 0.98

    def victim(self, keys, last_use):
        return int(np.lexsort((last_use, self.uses[keys[:, 0], keys[:, 1]]))[0])


def hit_rate(policy, chosen: np.ndarray, n_slots: int) -> float:
    """Replay in decode order through a pool of n_slots; the policy picks among slots the layer did not choose."""
    slots: dict[tuple[int, int], int] = {}  # (layer, expert) -> last use
    clock = hits = 0
    for token in chosen:
        for layer, experts in enumerate(token):
            policy.observe(layer, sorted(experts.tolist()))
            for e in experts.tolist():
                clock += 1
                if (layer, e) in slots:
                    hits += 1
                elif len(slots) == n_slots:
                    candidates = [key for key in slots if key[0] != layer or key[1] not in experts]
                    pick = policy.victim(np.array(candidates), np.array([slots[key] for key in candidates]))
                    assert 0 <= pick < len(candidates)
                    del slots[candidates[pick]]
                slots[(layer, e)] = clock
        policy.end_token()
    return hits / chosen[..., 0].size / TOP_K


def test_next_beats_lru_and_freq_when_history_foretells_routing():
    chosen = markov_trace(600)
    n_slots = N_LAYERS * N_EXPERTS // 4  # a 25 % budget
    rates = {name: hit_rate(policy, chosen, n_slots) for name, policy in
             (("next", NextUse(N_LAYERS, N_EXPERTS, TOP_K)), ("lru", Lru()), ("freq", DecayedFrequency()))}
    assert rates["next"] > 0.3  # learned successors: 0.306
    assert rates["lru"] < 0.2 and rates["freq"] < 0.2  # 0.194 and 0.165


def test_victim_is_always_one_of_the_candidates():
    """Slots in use are never offered; whatever the statistics, the choice is an index into those offered."""
    rng = np.random.default_rng(1)
    policy = NextUse(N_LAYERS, N_EXPERTS, TOP_K)
    for t in range(200):
        layer = t % N_LAYERS
        policy.observe(layer, sorted(rng.choice(N_EXPERTS, TOP_K, replace=False).tolist()))
        n = int(rng.integers(1, 6))
        keys = np.stack([rng.integers(0, N_LAYERS, n), rng.integers(0, N_EXPERTS, n)], axis=1)
        assert 0 <= policy.victim(keys, rng.permutation(n)) < n
