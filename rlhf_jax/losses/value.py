"""Value-function (critic) loss with optional PPO-style clipping.

    loss_t = 0.5 * max((V_t - R_t)**2, (clip(V_t, V_old_t - eps, V_old_t + eps) - R_t)**2)

and `0.5 * (V_t - R_t)**2` when `value_clip_eps` (eps) is None. Value clipping follows the PPO reference
implementation (Schulman et al., 2017, arXiv:1707.06347; OpenAI baselines ppo2) as used for
language models by Ziegler et al., 2019, arXiv:1909.08593. `old_values` and `returns` are
constants (stop-gradient).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate, check_aggregation
from rlhf_jax.ops.checks import check_floating, check_positive, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_mean, masked_var


def value_loss(
    values,
    old_values,
    returns,
    mask,
    *,
    value_clip_eps: float | None = None,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    global_token_count=None,
):
    """Clipped squared-error value loss.

    Args:
      values: `[B, T]` current value predictions V_t (gradients flow here).
      old_values: `[B, T]` predictions at rollout time (stop-gradient); may be None when
        `value_clip_eps` is None.
      returns: `[B, T]` regression targets R_t (e.g. GAE returns, stop-gradient).
      mask: `[B, T]`, 1 on counted tokens.
      value_clip_eps: value clip range around `old_values`; None disables clipping.
      aggregation, max_len, global_token_count: see `rlhf_jax.losses.aggregation.aggregate`.

    Returns:
      `(loss, metrics)` with `value/loss`, `value/clipfrac` (fraction of counted tokens where
      the clipped error is strictly larger), `value/mean` (token mean of V) and
      `value/explained_variance` (`1 - Var(R - V) / Var(R)` over counted tokens, 0 when
      `Var(R) == 0`).
    """
    check_rank(values, 2, "values")
    check_floating(values, "values")
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    check_aggregation(aggregation)
    if value_clip_eps is not None:
        check_positive(value_clip_eps, "value_clip_eps")
        if old_values is None:
            raise ValueError("`old_values` is required when `value_clip_eps` is set")

    counted = mask.astype(bool)
    weights = mask.astype(jnp.float32)
    values = values.astype(jnp.float32)
    returns = jnp.where(counted, jax.lax.stop_gradient(returns.astype(jnp.float32)), 0.0)
    unclipped = jnp.square(values - returns)
    if value_clip_eps is None:
        per_token = 0.5 * unclipped
        clip_active = jnp.zeros(values.shape, bool)
    else:
        old_values = jax.lax.stop_gradient(old_values.astype(jnp.float32))
        clipped_values = jnp.clip(values, old_values - value_clip_eps, old_values + value_clip_eps)
        clipped = jnp.square(clipped_values - returns)
        per_token = 0.5 * jnp.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate(
        per_token, mask, aggregation, max_len=max_len, global_token_count=global_token_count
    )

    returns_var = masked_var(returns, weights, unbiased=False)
    residual_var = masked_var(returns - values, weights, unbiased=False)
    explained_variance = jnp.where(
        returns_var > 0, 1.0 - residual_var / jnp.where(returns_var > 0, returns_var, 1.0), 0.0
    )
    metrics = {
        "value/loss": loss,
        "value/clipfrac": masked_mean(clip_active.astype(jnp.float32), weights),
        "value/mean": masked_mean(values, weights),
        "value/explained_variance": explained_variance,
    }
    return loss, jax.lax.stop_gradient(metrics)
