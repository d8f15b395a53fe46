"""Sampler against slow, obvious twins of transformers' warpers; seeds make draws repeatable."""

import numpy as np
import pytest
from moe.runtime.errors import MoeError
from moe.runtime.sampling import Sampler


def twin_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Filter by filter, as transformers writes them: masks of -inf on scores, softmax at the end."""
    scores = [x / temperature for x in logits.astype(np.float64)]
    n = len(scores)

    def softmax(s):
        m = max(s)
        e = [np.exp(x - m) if x != -np.inf else 0.0 for x in s]
        return [x / sum(e) for x in e]

    if top_k:
        kth = sorted(scores, reverse=True)[min(top_k, n) - 1]
        scores = [x if x >= kth else -np.inf for x in scores]
    if top_p < 1:
        p = softmax(scores)
        ascending = sorted(range(n), key=lambda i: p[i])
        total = 0.0
        for rank, i in enumerate(ascending):  # drop the low tail while its mass stays within 1 - top_p
            total += p[i]
            if total <= 1 - top_p and rank < n - 1:
                scores[i] = -np.inf
    if min_p:
        p = softmax(scores)
        scores = [x if p[i] >= min_p * max(p) else -np.inf for i, x in enumerate(scores)]
    return np.array(softmax(scores))


@pytest.fixture
def logits():
    return np.random.default_rng(3).normal(0, 2, 50).astype(np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 5, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.1),
    (0.8, 10, 0.8, 0.05), (2.0, 1, 1.0, 0.0), (1.0, 0, 1e-6, 0.0),
])
def test_probs_match_the_twin(logits, temperature, top_k, top_p, min_p):
    ours = Sampler(temperature, top_k, top_p, min_p).probs(logits)
    twin = twin_probs(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_allclose(ours, twin, rtol=1e-9, atol=1e-12)
    assert ours.sum() == pytest.approx(1.0)


def test_filter_semantics(logits):
    order = np.argsort(-logits)
    assert set(np.flatnonzero(Sampler(1.0, top_k=3).probs(logits))) == set(order[:3])
    p = Sampler(1.0).probs(logits)
    kept = np.flatnonzero(Sampler(1.0, top_p=0.6).probs(logits))
    head = order[: len(kept)]
    assert set(kept) == set(head) and p[head].sum() >= 0.6 > p[head[:-1]].sum()
    kept = np.flatnonzero(Sampler(1.0, min_p=0.2).probs(logits))
    assert set(kept) == set(np.flatnonzero(p >= 0.2 * p.max()))


def test_top_k_keeps_ties():
    assert np.count_nonzero(Sampler(1.0, top_k=2).probs(np.array([1.0, 3.0, 3.0, 3.0, 0.0]))) == 3


def test_greedy_is_argmax_and_ignores_seed(logits):
    assert Sampler(0.0, seed=1).sample(logits) == Sampler(0.0, seed=2).sample(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens(logits):
    a = Sampler(1.0, top_k=20, seed=7)
    b = Sampler(1.0, top_k=20, seed=7)
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]
    assert len({Sampler(1.0, seed=seed).sample(logits) for seed in range(20)}) > 1  # different seeds do differ


def test_draws_follow_the_distribution(logits):
    s = Sampler(1.5, top_k=8, seed=0)
    p = s.probs(logits)
    counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=logits.size)
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p))
    np.testing.assert_allclose(counts / counts.sum(), p, atol=0.015)


@pytest.mark.parametrize("kwargs, option", [
    (dict(temperature=-1), "--temperature"), (dict(top_k=-2), "--top-k"), (dict(top_p=0.0), "--top-p"),
    (dict(top_p=1.5), "--top-p"), (dict(min_p=-0.1), "--min-p"), (dict(temperature=float("nan")), "--temperature"),
])
def test_bad_settings_name_the_option(kwargs, option):
    with pytest.raises(MoeError, match=option) as info:
        Sampler(**kwargs)
    assert info.value.exit_code == 2


def test_non_finite_logits_are_a_runtime_error():
    with pytest.raises(MoeError) as info:
        Sampler(0.0).sample(np.array([0.0, np.nan, 1.0], np.float32))
    assert info.value.exit_code == 1
