"""Perplexity over consecutive, non-overlapping windows of a token stream (the protocol of `moe perplexity`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import MoeError


def perplexity(model, ids, ctx: int, progress: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """(exp(mean negative log-likelihood), tokens scored) of ids cut into windows of ctx tokens.

    A last partial window is dropped; each window runs alone (one prefill from an empty cache)
    and every token after its first is scored. progress(done, total) is called after each window.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ctx < 2:
        raise MoeError(f"--ctx {ctx}: a window needs at least 2 tokens")
    windows = ids.size // ctx
    if windows == 0:
        raise MoeError(f"the text has {ids.size} tokens, fewer than one window of --ctx {ctx}; lower --ctx")
    if ctx > model.max_context:
        raise MoeError(f"--ctx {ctx} exceeds the model's context of {model.max_context}; lower --ctx")
    total = 0.0
    for w in range(windows):
        window = ids[w * ctx: (w + 1) * ctx]
        total += _nll(model.logits(window)[:-1], window[1:])
        if progress is not None:
            progress(w + 1, windows)
    scored = windows * (ctx - 1)
    return math.exp(total / scored), scored


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of -log softmax(logits)[target], the normalizer accumulated in float64."""
    top = logits.max(axis=1)
    sums = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(targets.size), targets].astype(np.float64)
    return float(np.sum(np.log(sums) + top - picked))
