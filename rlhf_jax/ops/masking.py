"""Masked reductions over padded `[batch, time]` arrays.

A mask holds 1 on tokens that count (response tokens) and 0 on padding; it may be boolean
or float. Every reduction divides by the number of counted tokens, guarded against zero.
Padding never leaks: entries under a zero mask are replaced by 0 (not multiplied by 0, which
would keep a NaN or -inf), and reductions run in at least float32.
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.ops.checks import check_same_shape


def _select(x, mask):
    """`x * mask` for a 0/1 mask, in at least float32, with padding exactly 0 even if x is NaN there."""
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    mask = mask.astype(dtype)
    return jnp.where(mask != 0, x.astype(dtype) * mask, 0.0), mask


def masked_sum(x, mask, axis=None):
    """`sum(x * mask)` over `axis` (all axes when None)."""
    check_same_shape(x=x, mask=mask)
    selected, _ = _select(x, mask)
    return jnp.sum(selected, axis=axis)


def masked_mean(x, mask, axis=None):
    """`sum(x * mask) / max(sum(mask), 1)` over `axis` (all axes when None)."""
    check_same_shape(x=x, mask=mask)
    selected, mask = _select(x, mask)
    count = jnp.sum(mask, axis=axis)
    return jnp.sum(selected, axis=axis) / jnp.maximum(count, 1.0)


def masked_var(x, mask, *, unbiased: bool = True):
    """Variance of the counted entries of `x` (over all axes).

    With `unbiased=True` it uses Bessel's correction `n / (n - 1)`, as PPO implementations do
    when whitening advantages.
    """
    check_same_shape(x=x, mask=mask)
    x, mask = _select(x, mask)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = jnp.sum(mask)
        var = var * count / jnp.maximum(count - 1.0, 1.0)
    return var


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8):
    """`(x - mean) / sqrt(var + eps)` over the counted entries; masked entries become 0.

    With `shift_mean=False` the mean is added back, i.e. only the scale changes (reward
    whitening in RLHF keeps the mean so the KL penalty keeps its sign).
    """
    check_same_shape(x=x, mask=mask)
    x, mask = _select(x, mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask):
    """Index of the last nonzero entry of each row of a `[batch, time]` mask.

    Works for left and right padding. A row with no valid token gets index 0.
    """
    if jnp.ndim(mask) != 2:
        raise ValueError(f"`mask` must have rank 2 [batch, time], got shape {jnp.shape(mask)}")
    time = mask.shape[1]
    positions = jnp.arange(time)[None, :]
    return jnp.max(jnp.where(mask.astype(bool), positions, 0), axis=1)
