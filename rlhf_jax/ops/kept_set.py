"""Replaying the kept set of top-k / top-p sampling in a training forward pass.

A top-k or top-p sampler draws token `y` from the kept set renormalised, not from
`softmax(z)` with `z = logits / T`. The sampler records, per token, a threshold `t` that
separates the kept set from the rest: the midpoint between the smallest kept and the largest
excluded scaled logit (`rlhf_jax.models.sampling.select_kept_set`; `-inf` when nothing is
excluded). The trainer then scores

    log p_kept(y) = z_y - logsumexp_{v : z_v >= t'} z_v,     t' = min(t, z_y)

so the update's importance ratios compare the distribution the tokens were drawn from with
its own. The trainer's logits round differently from the sampler's (a full forward pass vs a
KV-cache decode step); the midpoint leaves half the gap between the kept set and the rest as
margin on each side, so the replayed set is the sampled one unless that gap is below the
rounding mismatch (a near-tie, where either choice is a near-equal distribution). `z_y` in
`t'` always keeps the drawn token.

`kept_set_logits` masks full `[..., V]` logits; `rlhf_jax.ops.chunked_head.chunked_head_stats`
with `kept_threshold` computes the same log-probs and entropy block by block without them
(what rollout scoring and the PPO / GRPO updates use).
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_positive


def kept_set_logits(logits, tokens, threshold, *, temperature=1.0):
    """`logits` with every entry outside the kept set set to `-inf` (module docstring).

    Args:
      logits: `[..., V]` raw (unscaled) logits.
      tokens: `[...]` the drawn tokens (always kept).
      threshold: `[...]` float32 kept-set thresholds in units of `logits / T`.
      temperature: the sampling temperature `T`.

    Returns:
      `[..., V]` float32 logits (unscaled), `-inf` outside the kept set; `token_logprobs` and
      `entropy_from_logits` of them (same `T`) score the kept distribution.
    """
    check_floating(logits, "logits")
    check_positive(temperature, "temperature")
    if jnp.shape(threshold) != jnp.shape(logits)[:-1] or jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(f"`tokens` and `threshold` must have shape {jnp.shape(logits)[:-1]} (the "
                         f"leading axes of `logits`), got {jnp.shape(tokens)} and {jnp.shape(threshold)}")
    logits = jnp.asarray(logits, jnp.float32)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    drawn = jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(kept_mask(scaled, drawn, jnp.asarray(threshold, jnp.float32)), logits, -jnp.inf)


def kept_mask(scaled, drawn, threshold):
    """The kept set `[..., V]` bool: `scaled_v >= min(t, scaled_y)` for scaled logits
    `[..., V]`, the drawn token's scaled logit `[...]` and the threshold `t` `[...]`."""
    return scaled >= jnp.minimum(threshold, drawn)[..., None]


__all__ = ["kept_mask", "kept_set_logits"]
