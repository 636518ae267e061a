"""Evaluation statistics against brute-force and hand-computed oracles."""
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.pipeline.eval_metrics import (distinct_n, eos_rate, mean_and_sem, mean_length,
                                            pass_at_k, pass_at_k_curve, repetition_rate, win_rate)


def _pass_at_k_comb(n, c, k):
    """Chen et al. 2021 definition, exactly: 1 - C(n-c, k) / C(n, k) (math.comb is 0 when k > n-c)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def _pass_at_k_enumerated(n, c, k):
    """Probability that a uniformly drawn k-subset of n samples (c correct) contains a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_pass_at_k_matches_comb_oracle(data):
    n = data.draw(st.integers(1, 80))
    k = data.draw(st.integers(1, n))
    c = data.draw(st.sampled_from([0, n, max(n - k + 1, 0), data.draw(st.integers(0, n))]))
    got = pass_at_k(n, c, k)
    assert got.shape == ()
    assert got == pytest.approx(_pass_at_k_comb(n, c, k), rel=1e-12, abs=1e-12)


def test_pass_at_k_vectorised_and_edge_cases():
    rng = np.random.default_rng(0)
    n = rng.integers(5, 70, size=200)
    c = rng.integers(0, n + 1)
    c[:5] = 0
    c[5:10] = n[5:10]
    k = 5
    c[10:15] = n[10:15] - k + 1  # k > n - c: always solved
    want = np.array([_pass_at_k_comb(int(ni), int(ci), k) for ni, ci in zip(n, c)])
    got = pass_at_k(n, c, k)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.all(got[:5] == 0.0) and np.all(got[5:15] == 1.0)
    # Scalar n broadcasts against per-problem c.
    np.testing.assert_allclose(pass_at_k(10, np.array([0, 3, 10]), 2),
                               [_pass_at_k_comb(10, c, 2) for c in (0, 3, 10)], rtol=1e-12)
    # pass@1 is the plain accuracy c / n.
    np.testing.assert_allclose(pass_at_k(n, c, 1), c / n, rtol=1e-12)


@pytest.mark.parametrize("n,c,k", [(6, 2, 3), (7, 0, 2), (5, 5, 4), (8, 3, 6), (6, 1, 1)])
def test_pass_at_k_matches_subset_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match=">= k"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match=r"\[0, num_samples\]"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="integers"):
        pass_at_k(4.0, 1, 1)


def test_pass_at_k_curve():
    rng = np.random.default_rng(1)
    correct = rng.random((30, 16)) < rng.random((30, 1))
    ks, values = pass_at_k_curve(correct, [1, 2, 4, 8, 16, 32, 4])
    np.testing.assert_array_equal(ks, [1, 2, 4, 8, 16])  # 32 > samples dropped, duplicates merged
    counts = correct.sum(axis=1)
    want = [np.mean([_pass_at_k_comb(16, int(c), int(k)) for c in counts]) for k in ks]
    np.testing.assert_allclose(values, want, rtol=1e-12)
    assert np.all(np.diff(values) >= 0)
    assert values[0] == pytest.approx(correct.mean())
    with pytest.raises(ValueError, match="problems, samples"):
        pass_at_k_curve(np.ones(4), [1])
    with pytest.raises(ValueError, match="0/1"):
        pass_at_k_curve(np.full((2, 2), 2), [1])


def test_distinct_n_hand_example():
    sequences = [[1, 2, 3, 1, 2], [1, 2, 4]]
    # unigrams: 1,2,3,1,2,1,2,4 -> unique {1,2,3,4}: 4/8
    assert distinct_n(sequences, 1) == pytest.approx(4 / 8)
    # bigrams: (1,2),(2,3),(3,1),(1,2),(1,2),(2,4) -> unique 4 of 6
    assert distinct_n(sequences, 2) == pytest.approx(4 / 6)
    # trigrams: (1,2,3),(2,3,1),(3,1,2),(1,2,4) -> all unique
    assert distinct_n(sequences, 3) == pytest.approx(1.0)
    assert distinct_n([[1, 2]], 3) == 0.0  # no trigram at all


def _distinct_oracle(sequences, n):
    grams = []
    for seq in sequences:
        grams += [" ".join(map(str, seq[i:i + n])) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=12), min_size=1, max_size=6),
       st.integers(1, 4))
def test_distinct_n_matches_set_oracle(sequences, n):
    assert distinct_n(sequences, n) == pytest.approx(_distinct_oracle(sequences, n))


def test_distinct_n_and_repetition_with_mask():
    tokens = np.array([[5, 5, 5, 5, 0, 0], [1, 2, 3, 4, 5, 6]])
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    ragged = [[5, 5, 5, 5], [1, 2, 3]]
    assert distinct_n(tokens, 2, mask=mask) == pytest.approx(_distinct_oracle(ragged, 2))
    # Row 1: bigrams (5,5)x3 -> 1 - 1/3; row 2: (1,2),(2,3) -> 0.
    assert repetition_rate(tokens, 2, mask=mask) == pytest.approx(((1 - 1 / 3) + 0.0) / 2)
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], 2) == pytest.approx(1 - 2 / 5)
    assert repetition_rate([[1]], 4) == 0.0
    with pytest.raises(ValueError, match="batch, time"):
        distinct_n(tokens, 2, mask=mask[:, :3])
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(ragged, 0)


def test_win_rate_and_mean_sem():
    a = np.array([1.0, 2.0, 3.0, 0.5, 2.0])
    b = np.array([0.0, 2.0, 4.0, 0.1, 1.0])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1 + 1) / 5)
    assert win_rate(b, a) == pytest.approx(1 - win_rate(a, b))
    with pytest.raises(ValueError, match="equal shape"):
        win_rate(a, b[:3])
    values = np.array([1.0, 2.0, 4.0, 7.0])
    mean, sem = mean_and_sem(values)
    assert mean == pytest.approx(3.5)
    want_sem = math.sqrt(sum((v - 3.5) ** 2 for v in values) / 3) / 2
    assert sem == pytest.approx(want_sem)
    assert mean_and_sem([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_and_sem([])


def test_lengths_and_eos_rate():
    eos = 9
    tokens = np.array([[4, 9, 0, 0], [3, 3, 3, 3], [9, 0, 0, 0], [7, 8, 0, 0], [1, 1, 9, 0]])
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]])
    assert mean_length(mask) == pytest.approx((2 + 4 + 1 + 2 + 3) / 5)
    # Rows ending in EOS: 0, 2, 4.
    assert eos_rate(tokens, mask, eos) == pytest.approx(3 / 5)
    # several stop ids: a row ending in any of them ended (row 3 ends in 8)
    assert eos_rate(tokens, mask, (eos, 8)) == pytest.approx(4 / 5)
    empty = np.zeros_like(mask)
    assert eos_rate(tokens, empty, eos) == 0.0
    with pytest.raises(ValueError, match="batch, time"):
        eos_rate(tokens[0], mask[0], eos)
    with pytest.raises(ValueError, match="mean_length"):
        mean_length(np.ones(3))
