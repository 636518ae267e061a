"""DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13).

With a maximum length `L_max` and a punishment interval (cache) `L_cache`, a response of
`|y|` tokens gets

    R_length(y) = 0                                  |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                = -1                                  L_max < |y|

added to its task reward (give it weight 1 next to the correctness reward).
"""
from __future__ import annotations


def overlong_penalty_value(length: int, max_length: int, cache_length: int) -> float:
    """`R_length` of a response of `length` tokens (the formula above)."""
    expected = max_length - cache_length
    if length <= expected:
        return 0.0
    if length <= max_length:
        return (expected - length) / cache_length
    return -1.0


def overlong_penalty(max_length: int, cache_length: int):
    """A reward function giving each completion `R_length` of its token count
    (`len(completion_ids)`, EOS included)."""
    if not isinstance(max_length, int) or not isinstance(cache_length, int) or not 0 < cache_length <= max_length:
        raise ValueError(f"need integers 0 < cache_length <= max_length, got max_length={max_length!r}, "
                         f"cache_length={cache_length!r}")

    def overlong(completions, completion_ids, **kwargs) -> list[float]:
        return [overlong_penalty_value(len(ids), max_length, cache_length) for ids in completion_ids]

    overlong.__name__ = "overlong_penalty"
    return overlong


__all__ = ["overlong_penalty_value", "overlong_penalty"]
