"""Entropy bonus for policy-gradient training.

    H_t = -sum_v p_t(v) log p_t(v),   p_t = softmax(logits_t / temperature)
    loss = -aggregate(H, mask)

The loss is the negative entropy, so adding `entropy_coef * loss` to a loss that is
minimised pushes the policy towards higher entropy (exploration bonus of A3C, Mnih et al.,
2016, arXiv:1602.01783, and of PPO, Schulman et al., 2017, arXiv:1707.06347).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate, check_aggregation
from rlhf_jax.ops.checks import check_floating, check_positive, check_rank
from rlhf_jax.ops.logprobs import entropy_from_logits
from rlhf_jax.ops.masking import masked_mean


def entropy_loss(
    logits,
    mask,
    *,
    temperature: float = 1.0,
    aggregation: str = "token_mean",
    max_len: int | None = None,
    global_token_count=None,
):
    """Negative aggregated token entropy of the policy.

    Args:
      logits: `[B, T, V]` policy logits aligned with the response tokens.
      mask: `[B, T]`, 1 on counted tokens.
      temperature: the sampling temperature; entropy is that of `softmax(logits / T)`.
      aggregation, max_len, global_token_count: see `rlhf_jax.losses.aggregation.aggregate`.

    Returns:
      `(loss, metrics)` with `loss = -aggregate(H)` and `entropy/mean` (token mean of H).
    """
    check_rank(logits, 3, "logits")
    check_floating(logits, "logits")
    check_rank(mask, 2, "mask")
    if jnp.shape(mask) != jnp.shape(logits)[:2]:
        raise ValueError(
            f"`mask` must have shape {jnp.shape(logits)[:2]} (the first two axes of `logits`), "
            f"got {jnp.shape(mask)}"
        )
    check_positive(temperature, "temperature")
    check_aggregation(aggregation)

    entropy = entropy_from_logits(logits, temperature=temperature).astype(jnp.float32)
    loss = -aggregate(
        entropy, mask, aggregation, max_len=max_len, global_token_count=global_token_count
    )
    metrics = {"entropy/mean": masked_mean(entropy, mask.astype(jnp.float32))}
    return loss, jax.lax.stop_gradient(metrics)
