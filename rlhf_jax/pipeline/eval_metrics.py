"""Evaluation statistics in plain NumPy: pass@k, diversity, win rate, lengths, EOS rate.

These run on host arrays after generation and scoring; nothing here is traced by jax.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021, "Evaluating Large Language Models
    Trained on Code", arXiv:2107.03374).

        pass@k = 1 - C(n - c, k) / C(n, k)
               = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)      (stable product form)

    which is 1 when fewer than k samples are wrong (n - c < k).

    Args:
      num_samples: n, samples drawn per problem (scalar or [problems], ints >= k).
      num_correct: c, correct samples per problem (same shape, 0 <= c <= n).
      k: samples allowed per problem (>= 1).
    Returns:
      float64 array with the broadcast shape of n and c (0-d for scalars).
    """
    n = np.asarray(num_samples)
    c = np.asarray(num_correct)
    if not (np.issubdtype(n.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)):
        raise ValueError("pass_at_k: num_samples and num_correct must be integers")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"pass_at_k: k must be an int >= 1, got {k!r}")
    n, c = np.broadcast_arrays(n.astype(np.int64), c.astype(np.int64))
    if np.any(c < 0) or np.any(c > n):
        raise ValueError("pass_at_k: num_correct must lie in [0, num_samples]")
    if np.any(n < k):
        raise ValueError(f"pass_at_k: every num_samples must be >= k={k}, got min {n.min()}")
    # Factors i = n - c + 1 .. n, laid out on a padded grid: column j holds i = n - j.
    width = int(c.max()) if c.size else 0
    j = np.arange(width)
    i = n[..., None] - j  # [..., width]
    active = j < c[..., None]
    factors = np.where(active, 1.0 - k / np.where(active, i, 1), 1.0)
    result = 1.0 - np.prod(np.maximum(factors, 0.0), axis=-1)
    return np.where(n - c < k, 1.0, result).astype(np.float64)


def pass_at_k_curve(correct: np.ndarray, ks: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean pass@k over problems for each k, from a `[problems, samples]` correctness matrix.

    Args:
      correct: bool/0-1 array, `correct[p, s]` is whether sample s of problem p is correct.
      ks: the k values; those larger than the number of samples are dropped.
    Returns:
      (ks, pass@k means) as int64 and float64 arrays.
    """
    correct = np.asarray(correct)
    if correct.ndim != 2:
        raise ValueError(f"pass_at_k_curve: correct must be [problems, samples], got shape {correct.shape}")
    if not np.all((correct == 0) | (correct == 1)):
        raise ValueError("pass_at_k_curve: correct must hold 0/1 or booleans")
    num_samples = correct.shape[1]
    num_correct = correct.astype(np.int64).sum(axis=1)
    kept = np.array(sorted({int(k) for k in ks if 1 <= int(k) <= num_samples}), dtype=np.int64)
    values = np.array([pass_at_k(num_samples, num_correct, int(k)).mean() for k in kept],
                      dtype=np.float64)
    return kept, values


def _ngrams(sequence: Sequence, n: int) -> list[tuple]:
    return [tuple(sequence[t:t + n]) for t in range(len(sequence) - n + 1)]


def _as_token_lists(token_sequences, mask) -> list[list]:
    if mask is None:
        return [list(np.asarray(seq).tolist()) for seq in token_sequences]
    tokens, mask = np.asarray(token_sequences), np.asarray(mask)
    if tokens.shape != mask.shape or tokens.ndim != 2:
        raise ValueError(f"tokens and mask must both be [batch, time], got {tokens.shape} and {mask.shape}")
    return [row[keep.astype(bool)].tolist() for row, keep in zip(tokens, mask)]


def distinct_n(token_sequences, n: int, *, mask=None) -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
    Conversation Models", arXiv:1510.03055): unique n-grams / total n-grams, pooled over all
    sequences. 0.0 when there are no n-grams at all.

    Args:
      token_sequences: a list of token lists (ragged), or a `[batch, time]` array with `mask`.
      n: n-gram length (>= 1).
      mask: optional `[batch, time]` 0/1 mask selecting the response tokens of each row.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    grams = [g for seq in _as_token_lists(token_sequences, mask) for g in _ngrams(seq, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(token_sequences, n: int = 4, *, mask=None) -> float:
    """Mean over sequences of the share of n-grams that repeat an earlier n-gram of the same
    sequence: `1 - unique / total` within each sequence (sequences shorter than n count 0).
    High values flag degenerate loops, a common reward-hacking symptom.
    """
    if n < 1:
        raise ValueError(f"repetition_rate: n must be >= 1, got {n}")
    rates = []
    for seq in _as_token_lists(token_sequences, mask):
        grams = _ngrams(seq, n)
        rates.append(1.0 - len(set(grams)) / len(grams) if grams else 0.0)
    return float(np.mean(rates)) if rates else 0.0


def win_rate(scores_a, scores_b) -> float:
    """Share of paired comparisons A wins, ties counting half: mean(1[a > b] + 0.5 * 1[a == b])."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate: scores must be non-empty 1-D arrays of equal shape, got {a.shape} and {b.shape}")
    return float(np.mean((a > b) + 0.5 * (a == b)))


def mean_and_sem(values) -> tuple[float, float]:
    """Mean and standard error of the mean, std(ddof=1) / sqrt(count); sem is 0 for one value."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_and_sem: no values")
    sem = float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    return float(values.mean()), sem


def mean_length(mask) -> float:
    """Mean number of response tokens per sequence, from a `[batch, time]` 0/1 mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.shape[0] == 0:
        raise ValueError(f"mean_length: mask must be [batch, time] with batch > 0, got {mask.shape}")
    return float(mask.astype(np.float64).sum(axis=1).mean())


def eos_rate(tokens, mask, eos_token_id) -> float:
    """Share of responses whose last response token is EOS (finished rather than cut off).

    Args:
      tokens: `[batch, time]` token ids.
      mask: `[batch, time]` 0/1 response mask (tokens after EOS already masked out).
      eos_token_id: the end-of-sequence id, or a tuple of stop ids (any of them counts).
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    if tokens.shape != mask.shape or tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"eos_rate: tokens and mask must both be [batch, time], got {tokens.shape} and {mask.shape}")
    lengths = mask.sum(axis=1)
    last = np.where(lengths > 0, tokens.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
    ended = (lengths > 0) & np.isin(tokens[np.arange(tokens.shape[0]), last], np.asarray(eos_token_id).reshape(-1))
    return float(ended.mean())
