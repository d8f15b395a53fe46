"""Routers (float32): which k experts each token goes to and with what weight, then tokens grouped by expert.

Top-k order is (value descending, index ascending), so ties go to the lower index as in torch.topk.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import FLAGS


@njit(**FLAGS)
def _topk(row, k, idx):
    """The k largest entries of row (E,) into idx (k,), best first, ties to the lower index. NaN ranks as -inf,
    so a damaged weight still gives k distinct experts in 0..E-1 (idx indexes buffers unchecked)."""
    E = row.shape[0]
    last_v = np.float32(np.inf)
    last_e = -1
    for s in range(k):
        best = -1
        best_v = np.float32(-np.inf)
        for e in range(E):
            v = row[e]
            if v != v:
                v = np.float32(-np.inf)
            after_last = v < last_v or (v == last_v and e > last_e)
            if after_last and (best < 0 or v > best_v):
                best = e
                best_v = v
        idx[s] = best
        last_v = best_v
        last_e = best


@njit(**FLAGS)
def _softmax(row):
    """row (E,) replaced by its softmax."""
    m = row.max()
    total = np.float32(0.0)
    for e in range(row.shape[0]):
        row[e] = np.float32(math.exp(row[e] - m))
        total += row[e]
    for e in range(row.shape[0]):
        row[e] = row[e] / total


@njit(**FLAGS)
def _keep_best_groups(values, n_group, rated_by, topk_group, fill, group_scores, kept):
    """Rate each of n_group groups of consecutive entries of values (E,) by the sum of its `rated_by` (1 or 2)
    largest, and overwrite the entries outside the topk_group best groups (ties to the lower group) with fill.
    group_scores (n_group,) and kept (topk_group,) are scratch."""
    size = values.shape[0] // n_group
    for g in range(n_group):
        first = np.float32(-np.inf)
        second = np.float32(-np.inf)
        for e in range(g * size, (g + 1) * size):
            v = values[e]
            if v > first:
                second = first
                first = v
            elif v > second:
                second = v
        group_scores[g] = first if rated_by == 1 else first + second
    _topk(group_scores, topk_group, kept)
    for g in range(n_group):
        if not (kept == g).any():
            values[g * size: (g + 1) * size] = fill


@njit(**FLAGS)
def softmax_topk(logits, k, renormalize, idx, weights):
    """Mixtral, Qwen3-MoE, OLMoE: softmax over all E logits (T, E), top-k of the probabilities,
    renormalized to sum 1 when `renormalize`. Writes idx (T, k) int64 and weights (T, k) f32.
    logits is overwritten by the probabilities."""
    T = logits.shape[0]
    for t in range(T):
        row = logits[t]
        _softmax(row)
        _topk(row, k, idx[t])
        norm = np.float32(0.0)
        for s in range(k):
            weights[t, s] = row[idx[t, s]]
            norm += weights[t, s]
        if renormalize:
            for s in range(k):
                weights[t, s] = weights[t, s] / norm


@njit(**FLAGS)
def topk_softmax(logits, k, idx, weights):
    """gpt-oss: top-k of the logits (T, E) (router bias already added), softmax over those k only."""
    T = logits.shape[0]
    for t in range(T):
        row = logits[t]
        _topk(row, k, idx[t])
        m = row[idx[t, 0]]
        total = np.float32(0.0)
        for s in range(k):
            weights[t, s] = np.float32(math.exp(row[idx[t, s]] - m))
            total += weights[t, s]
        for s in range(k):
            weights[t, s] = weights[t, s] / total


@njit(**FLAGS)
def sigmoid_topk(logits, k, idx, weights):
    """Llama 4: top-k of the logits (T, E); each chosen expert's weight is sigmoid(logit),
    which scales that expert's input (the caller applies it there)."""
    T = logits.shape[0]
    for t in range(T):
        row = logits[t]
        _topk(row, k, idx[t])
        for s in range(k):
            weights[t, s] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-row[idx[t, s]])))


@njit(**FLAGS)
def sigmoid_group_topk(logits, correction, k, n_group, topk_group, renormalize, scale, idx, weights):
    """GLM-4.5, DeepSeek-V3: scores sigmoid(logits) (T, E); the choice values are score + correction (E,).
    Each of n_group groups of consecutive experts is rated by the sum of its best two choice values; within the
    topk_group best groups, the k best choice values pick the experts. Their weight is their uncorrected score,
    divided by the k scores' sum (+ 1e-20, as transformers) when `renormalize`, times `scale`.
    logits is overwritten by the scores."""
    T, E = logits.shape
    choice = np.empty(E, np.float32)
    group_scores = np.empty(n_group, np.float32)
    kept = np.empty(topk_group, np.int64)
    for t in range(T):
        row = logits[t]
        for e in range(E):
            row[e] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-row[e])))
            choice[e] = row[e] + correction[e]
        _keep_best_groups(choice, n_group, 2, topk_group, np.float32(-np.inf), group_scores, kept)
        _topk(choice, k, idx[t])
        norm = np.float32(0.0)
        for s in range(k):
            weights[t, s] = row[idx[t, s]]
            norm += weights[t, s]
        for s in range(k):
            if renormalize:
                weights[t, s] = weights[t, s] / (norm + np.float32(1e-20))
            weights[t, s] = weights[t, s] * np.float32(scale)


@njit(**FLAGS)
def softmax_group_topk(logits, k, n_group, topk_group, scale, idx, weights):
    """DeepSeek-V2's group_limited_greedy: softmax over all E logits (T, E); each of n_group groups of consecutive
    experts is rated by its largest probability; within the topk_group best groups (the others' probabilities set to
    0, as transformers masks them) the k largest pick the experts, which weigh their probability times `scale`, not
    renormalized. logits is overwritten by the masked probabilities."""
    T = logits.shape[0]
    group_scores = np.empty(n_group, np.float32)
    kept = np.empty(topk_group, np.int64)
    for t in range(T):
        row = logits[t]
        _softmax(row)
        _keep_best_groups(row, n_group, 1, topk_group, np.float32(0.0), group_scores, kept)
        _topk(row, k, idx[t])
        for s in range(k):
            weights[t, s] = row[idx[t, s]] * np.float32(scale)


@njit(**FLAGS)
def group_by_expert(idx, n_experts, offsets, order, active, uses):
    """Sort the (token, slot) pairs of idx (T, k) by expert, tokens in order within an expert.

    offsets (E+1,): expert e's pairs are order[offsets[e]:offsets[e+1]], each entry t * k + slot
    (a flat index into idx and the weights). active (E,) receives the experts chosen at least once,
    ascending; returns how many. uses (E,) counts the tokens each expert received.
    """
    T, k = idx.shape
    offsets[:] = 0
    for t in range(T):
        for s in range(k):
            offsets[idx[t, s] + 1] += 1
    n_active = 0
    for e in range(n_experts):
        count = offsets[e + 1]
        uses[e] += count
        if count > 0:
            active[n_active] = e
            n_active += 1
        offsets[e + 1] += offsets[e]
    for t in range(T):  # offsets[e] is expert e's write cursor; it ends at e's end
        for s in range(k):
            e = idx[t, s]
            order[offsets[e]] = t * k + s
            offsets[e] += 1
    for e in range(n_experts, 0, -1):  # ends back to starts
        offsets[e] = offsets[e - 1]
    offsets[0] = 0
    return n_active
