"""REINFORCE policy-gradient loss (Williams, 1992, "Simple statistical gradient-following
algorithms for connectionist reinforcement learning", Machine Learning 8).

    A_t = G_t - b_t                       (optionally whitened over the mask)
    loss_t = -logp_t * stop_gradient(A_t)
    loss = aggregate(loss_t, mask)

The gradient of `loss` is the score-function estimate `-E[A_t * grad log pi(y_t)]`. With
sequence-level returns `[B]` and `aggregation="sequence_sum"` this is the classic
`-mean_b(A_b * sum_t logp_bt)`; a baseline `b` independent of the action keeps the estimate
unbiased and lowers its variance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate, check_aggregation
from rlhf_jax.ops.checks import check_floating, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_mean, masked_var, masked_whiten


def _token_level(x, shape, name):
    """`[B]` or `[B, T]` -> float32 `[B, T]` (sequence values repeated over time)."""
    check_rank(x, (1, 2), name)
    if jnp.shape(x) not in (tuple(shape), tuple(shape[:1])):
        raise ValueError(
            f"`{name}` must have shape {tuple(shape)} or {tuple(shape[:1])}, got {jnp.shape(x)}"
        )
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 1:
        x = x[:, None]
    return jnp.broadcast_to(x, shape)


def reinforce_loss(
    logp,
    returns,
    mask,
    *,
    baseline=None,
    normalize: bool = False,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    global_token_count=None,
):
    """REINFORCE with an optional baseline and advantage whitening.

    Args:
      logp: `[B, T]` log-probs of the sampled tokens (gradients flow here).
      returns: `[B, T]` per-token returns G_t or `[B]` sequence returns (stop-gradient).
      mask: `[B, T]`, 1 on counted tokens.
      baseline: optional `[B, T]` or `[B]` baseline b subtracted from the returns
        (stop-gradient).
      normalize: whiten `A = G - b` over the counted tokens (`(A - mean) / sqrt(var + 1e-8)`,
        unbiased variance) before using it.
      aggregation, max_len, global_token_count: see `rlhf_jax.losses.aggregation.aggregate`.

    Returns:
      `(loss, metrics)` with `reinforce/loss`, `reinforce/return_mean`,
      `reinforce/advantage_mean` and `reinforce/advantage_std` (token statistics of the
      advantage actually used, i.e. after whitening; unbiased std).
    """
    check_rank(logp, 2, "logp")
    check_floating(logp, "logp")
    check_same_shape(logp=logp, mask=mask)
    check_aggregation(aggregation)

    counted = mask.astype(bool)
    weights = mask.astype(jnp.float32)
    returns = jnp.where(counted, _token_level(returns, logp.shape, "returns"), 0.0)
    advantages = returns
    if baseline is not None:
        advantages = returns - jnp.where(
            counted, _token_level(baseline, logp.shape, "baseline"), 0.0
        )
    if normalize:
        advantages = masked_whiten(advantages, weights)
    advantages = jax.lax.stop_gradient(advantages)

    per_token = -logp.astype(jnp.float32) * advantages
    loss = aggregate(
        per_token, mask, aggregation, max_len=max_len, global_token_count=global_token_count
    )
    metrics = {
        "reinforce/loss": loss,
        "reinforce/return_mean": masked_mean(returns, weights),
        "reinforce/advantage_mean": masked_mean(advantages, weights),
        "reinforce/advantage_std": jnp.sqrt(masked_var(advantages, weights)),
    }
    return loss, jax.lax.stop_gradient(metrics)
