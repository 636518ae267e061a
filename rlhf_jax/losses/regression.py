"""Weighted-regression policy improvement: RWR and AWR.

Both turn a return signal into per-sequence weights and fit the policy by weighted maximum
likelihood on its own (or logged) samples:

    loss = mean_b( w_b * NLL_b ),   NLL_b = -mean_t(logp_bt) over the response tokens of row b

- Reward-weighted regression (Peters & Schaal, 2007, "Reinforcement learning by
  reward-weighted regression for operational space control", ICML): `w ~ exp(beta * r)`.
- Advantage-weighted regression (Peng et al., 2019, arXiv:1910.00177):
  `w = min(exp(A / beta), max_weight)`.

The weights are constants of the loss (stop-gradient).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_positive, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_mean


def _check_non_negative(value, name: str) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")


def rwr_weights(rewards, *, beta: float = 1.0, top_k: int | None = None):
    """Reward-weighted-regression weights (Peters & Schaal, 2007).

        z_b = (r_b - mean(r)) / (std(r) + 1e-8)      (over the batch, unbiased std)
        w_b = exp(beta * z_b) / mean_{kept}(exp(beta * z))   for kept rows, 0 otherwise

    Kept rows are all rows, or with `top_k` the `k` rows with the highest rewards (exactly
    `k`; ties go to the lower index). The kept weights average to 1, so the loss scale does
    not depend on `beta` or on the batch size. Computed as `k * softmax` over the kept rows,
    so large `beta` cannot overflow.

    Args:
      rewards: `[B]` sequence rewards.
      beta: inverse temperature (>= 0); 0 gives uniform weights over the kept rows.
      top_k: optional number of rows to keep, an int in `[1, B]`.

    Returns:
      `[B]` float32 weights (stop-gradient).
    """
    check_rank(rewards, 1, "rewards")
    check_floating(rewards, "rewards")
    _check_non_negative(beta, "beta")
    batch = rewards.shape[0]
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= batch
    ):
        raise ValueError(f"`top_k` must be an int in [1, {batch}], got {top_k!r}")

    rewards = jax.lax.stop_gradient(rewards.astype(jnp.float32))
    mean = jnp.mean(rewards)
    std = jnp.sqrt(jnp.sum((rewards - mean) ** 2) / max(batch - 1, 1))
    scores = beta * (rewards - mean) / (std + 1e-8)
    kept_count = batch if top_k is None else top_k
    if top_k is None:
        kept = jnp.ones((batch,), bool)
    else:
        _, kept_index = jax.lax.top_k(rewards, top_k)
        kept = jnp.zeros((batch,), bool).at[kept_index].set(True)
    weights = kept_count * jax.nn.softmax(jnp.where(kept, scores, -jnp.inf))
    return jnp.where(kept, weights, 0.0)


def awr_weights(
    advantages,
    *,
    beta: float = 1.0,
    max_weight: float | None = 20.0,
    normalize: bool = True,
):
    """Advantage-weighted-regression weights (Peng et al., 2019, arXiv:1910.00177).

        w_b = min(exp(A_b / beta), max_weight)                  (the paper's weights)
        w_b <- w_b / mean(w)                                     (when `normalize`)

    The advantages are used as given (whiten them beforehand if their scale varies). The
    cap is applied first, on the paper's scale, then the optional normalisation rescales
    the batch so the weights average 1 (so a normalised weight may exceed `max_weight`).
    The cap is computed as `exp(min(A / beta, log(max_weight)))`, which cannot overflow.

    Args:
      advantages: `[B]` sequence advantages.
      beta: temperature (> 0).
      max_weight: cap on the unnormalised weight (> 0), or None for no cap.
      normalize: divide by the batch mean of the capped weights.

    Returns:
      `[B]` float32 weights (stop-gradient).
    """
    check_rank(advantages, 1, "advantages")
    check_floating(advantages, "advantages")
    check_positive(beta, "beta")
    if max_weight is not None:
        check_positive(max_weight, "max_weight")

    advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
    exponent = advantages / beta
    if max_weight is not None:
        exponent = jnp.minimum(exponent, math.log(max_weight))
    weights = jnp.exp(exponent)
    if normalize:
        weights = weights / jnp.mean(weights)
    return weights


def weighted_nll_loss(logp, mask, weights):
    """Weighted negative log-likelihood, the fitting step of RWR / AWR.

        NLL_b = -sum_t(logp_bt * m_bt) / max(sum_t m_bt, 1)
        loss  = mean_b(stop_gradient(w_b) * NLL_b)

    Args:
      logp: `[B, T]` per-token log-probs of the target tokens (gradients flow here).
      mask: `[B, T]`, 1 on counted tokens.
      weights: `[B]` per-sequence weights (e.g. from `rwr_weights` / `awr_weights`).

    Returns:
      `(loss, metrics)` with `regression/loss`, `regression/nll` (unweighted mean of
      NLL_b), `regression/weight_max` and `regression/effective_sample_size`
      (`(sum w)**2 / sum w**2`, in rows).
    """
    check_rank(logp, 2, "logp")
    check_floating(logp, "logp")
    check_same_shape(logp=logp, mask=mask)
    check_rank(weights, 1, "weights")
    if jnp.shape(weights) != jnp.shape(logp)[:1]:
        raise ValueError(
            f"`weights` must have shape {jnp.shape(logp)[:1]} (one per row of `logp`), "
            f"got {jnp.shape(weights)}"
        )

    counted = mask.astype(bool)
    token_logp = jnp.where(counted, logp.astype(jnp.float32), 0.0)
    nll = -masked_mean(token_logp, mask.astype(jnp.float32), axis=1)
    weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
    loss = jnp.mean(weights * nll)
    weight_sum = jnp.sum(weights)
    weight_sq_sum = jnp.sum(weights**2)
    metrics = {
        "regression/loss": loss,
        "regression/nll": jnp.mean(nll),
        "regression/weight_max": jnp.max(weights),
        "regression/effective_sample_size": jnp.where(
            weight_sq_sum > 0, weight_sum**2 / jnp.where(weight_sq_sum > 0, weight_sq_sum, 1.0), 0.0
        ),
    }
    return loss, jax.lax.stop_gradient(metrics)
