"""Choosing the next token from logits: greedy, or temperature then top-k, top-p and min-p filters.

The filters follow transformers' logits warpers, applied in the same order
(TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper).
"""

from __future__ import annotations

import numpy as np

from .errors import MoeError


class Sampler:
    """Draws token ids from one seeded numpy Generator: the same seed gives the same tokens."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 seed: int | None = None):
        if not temperature >= 0:
            raise MoeError(f"--temperature {temperature} must be 0 (greedy) or more")
        if top_k < 0:
            raise MoeError(f"--top-k {top_k} must be 0 (off) or more")
        if not 0 < top_p <= 1:
            raise MoeError(f"--top-p {top_p} must be in (0, 1]; 1 turns it off")
        if not 0 <= min_p <= 1:
            raise MoeError(f"--min-p {min_p} must be in [0, 1]; 0 turns it off")
        if seed is not None and seed < 0:
            raise MoeError(f"--seed {seed} must be 0 or more")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)
        self.min_p = float(min_p)
        self.rng = np.random.default_rng(seed)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution sampled from (temperature > 0): f64 [V], zero outside the kept tokens, sums to 1."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        keep = np.ones(z.shape, dtype=bool)
        if 0 < self.top_k < z.size:
            kth = np.partition(z, z.size - self.top_k)[z.size - self.top_k]
            keep &= z >= kth  # ties with the k-th value stay, as in transformers
        p = _softmax(z, keep)
        if self.top_p < 1:
            order = np.argsort(-p, kind="stable")
            mass_before = np.cumsum(p[order]) - p[order]
            top = np.zeros_like(keep)
            top[order[mass_before < self.top_p]] = True  # the smallest head of the distribution reaching top_p
            keep &= top
            p = _softmax(z, keep)
        if self.min_p > 0:
            keep &= p >= self.min_p * p.max()
            p = _softmax(z, keep)
        return p

    def sample(self, logits: np.ndarray) -> int:
        """One token id from logits f32 [V]."""
        if not np.isfinite(np.max(logits)):
            raise MoeError("the model produced non-finite logits; the model file may be damaged (try `moe verify`)", 1)
        if self.temperature == 0:
            return int(np.argmax(logits))
        cdf = np.cumsum(self.probs(logits))
        return int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))


def _softmax(z: np.ndarray, keep: np.ndarray) -> np.ndarray:
    e = np.where(keep, np.exp(z - z[keep].max()), 0.0)
    return e / e.sum()
