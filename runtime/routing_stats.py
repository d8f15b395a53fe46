"""Which experts tokens choose: the trace of one prompt, and the profile of a workload.

Both come from `Model.routing_trace` (per MoE layer: the chosen experts (T, k) and their weights).
Profile definitions, per MoE layer over sequences of T tokens (k experts per token, E experts):
  share[e]      fraction of tokens that chose expert e (the shares sum to k);
  entropy       of the usage distribution share / k, in bits (log2 E when every expert serves alike);
  reuse_any     fraction of consecutive token pairs whose expert sets share at least one expert;
  reuse_overlap mean |S_t & S_t-1| / k: the fraction of a token's experts the previous token also chose;
  distinct      mean number of distinct experts over consecutive non-overlapping windows of N tokens.
`hottest`: every (layer, expert) pair by tokens served, most first: what `--pin` keeps resident.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import MoeError
from .files import load_json, not_a_file

PROFILE_FORMAT = "moe-profile"


def routed(model, ids) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Run ids from an empty cache; per MoE layer, (experts (T, k) int64, weights (T, k) f32)."""
    model.routing_trace = []
    try:
        model.reset()
        model.forward(np.asarray(ids, dtype=np.int64), last_only=True)
        return {layer: (idx, w) for layer, idx, w in model.routing_trace}
    finally:
        model.routing_trace = None


def trace(model, ids: list[int]) -> dict:
    """The experts each token chose in each MoE layer, heaviest first (the records of `moe trace --json`)."""
    chosen = routed(model, ids)
    tokens = []
    for t, token in enumerate(ids):
        layers = []
        for layer, (idx, w) in chosen.items():
            order = np.argsort(-w[t], kind="stable")
            layers.append({"layer": layer, "experts": idx[t, order].tolist(),
                           "weights": [round(float(x), 4) for x in w[t, order]]})
        tokens.append({"id": int(token), "text": model.tokenizer.decode([int(token)]), "layers": layers})
    return {"tokens": tokens}


def profile(model, ids: list[int], ctx: int = 512, window: int = 32, progress=None) -> dict:
    """Routing statistics of ids run in consecutive sequences of `ctx` tokens (as perplexity cuts a file)."""
    if len(ids) < 2:
        raise MoeError("the workload holds fewer than 2 tokens; give a longer text")
    if window < 1:
        raise MoeError(f"--window {window}: must be at least 1")
    ctx = min(ctx, model.max_context)
    starts = range(0, len(ids), ctx)
    sequences: dict[int, list[np.ndarray]] = {}
    for n, start in enumerate(starts):
        for layer, (idx, _) in routed(model, ids[start: start + ctx]).items():
            sequences.setdefault(layer, []).append(idx)
        if progress:
            progress(n + 1, len(starts))
    cfg = model.config
    stats = usage(sequences, cfg.num_experts, window)
    return {"format": PROFILE_FORMAT, "model": str(model.layout.folder), "architecture": cfg.architecture,
            "tokens": len(ids), "ctx": ctx, "window": window, "experts": cfg.num_experts, "top_k": cfg.top_k, **stats}


def usage(sequences: dict[int, list[np.ndarray]], num_experts: int, window: int) -> dict:
    """Per-layer statistics (see the module's docstring) from each layer's chosen experts, (T, k) per sequence."""
    layers = []
    counts_by_layer = {}
    for layer, seqs in sequences.items():
        k = seqs[0].shape[1]
        tokens = sum(len(s) for s in seqs)
        counts = np.zeros(num_experts, np.int64)
        pairs = shared_any = overlap = 0
        distinct = []
        for s in seqs:
            np.add.at(counts, s.ravel(), 1)
            member = np.zeros((len(s), num_experts), bool)  # (T, E): token t chose expert e
            member[np.arange(len(s))[:, None], s] = True
            common = (member[1:] & member[:-1]).sum(axis=1)  # (T-1,) experts shared with the previous token
            pairs += len(common)
            shared_any += int((common > 0).sum())
            overlap += int(common.sum())
            distinct += [int(member[i: i + window].any(axis=0).sum()) for i in range(0, len(s) - window + 1, window)]
        p = counts / counts.sum()
        nz = p[p > 0]
        counts_by_layer[layer] = counts
        layers.append({
            "layer": layer,
            "tokens": tokens,
            "counts": counts.tolist(),
            "share": (counts / tokens).round(6).tolist(),
            "entropy_bits": float(-(nz * np.log2(nz)).sum()),
            "max_entropy_bits": math.log2(num_experts),
            "reuse_any": shared_any / pairs if pairs else None,
            "reuse_overlap": overlap / (pairs * k) if pairs else None,
            "distinct_per_window": float(np.mean(distinct)) if distinct else None,
        })
    share = {(layer, e): c / max(1, sum(len(s) for s in sequences[layer]))
             for layer, counts in counts_by_layer.items() for e, c in enumerate(counts.tolist())}
    hottest = sorted(share, key=lambda key: (-share[key], key))
    return {"layers": layers, "hottest": [list(key) for key in hottest]}


def read_pins(path, config: ModelConfig) -> list[tuple[int, int]]:
    """The (layer, expert) pairs of a profile file, hottest first, checked against the model of `config`."""
    path = Path(path)
    remedy = f"make one with `moe profile MODEL FILE -o {path.name}`"
    if not_a_file(path) == "missing":
        raise MoeError(f"--pin {path}: no such file; {remedy}")
    data = load_json(path, remedy, f"--pin {path}")
    try:
        pairs = [(int(layer), int(expert)) for layer, expert in data["hottest"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise MoeError(f"--pin {path}: not a profile made by `moe profile` ({type(exc).__name__}: {exc})") from None
    moe_layers = set(config.moe_layers())
    for layer, expert in pairs:
        if layer not in moe_layers or not 0 <= expert < config.num_experts:
            raise MoeError(f"--pin {path}: layer {layer} expert {expert} is not in this model; the profile was made "
                           "for another model, run `moe profile` on this one")
    return pairs
