"""Replaying the kept set of top-k / top-p sampling in a training forward pass.

A top-k or top-p sampler draws token `y` from the kept set renormalised, not from
`softmax(z)` with `z = logits / T`. The sampler records, per token, the kept set's threshold
`t` (its smallest scaled logit, `rlhf_jax.models.sampling.select_kept_set`); the trainer then
scores

    log p_kept(y) = z_y - logsumexp_{v : z_v >= t'} z_v,
    t' = min(t - tolerance * max(1, |t|), z_y)

so the update's importance ratios compare the distribution the tokens were drawn from with
its own. The trainer's logits round differently from the sampler's (a KV-cache decode step
vs a full forward pass), and the kept set's smallest token sits exactly at `t`: the
tolerance keeps it (and any token within the tolerance below it, a near-tie), and `z_y` in
`t'` always keeps the drawn token. Set the tolerance above the sampler-trainer logit
mismatch: the default 1e-4 suits float32; bfloat16 logits need about 1e-2. Positions with
`t = -inf` keep the whole vocabulary.
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_positive


KEPT_SET_TOLERANCE = 1e-4


def kept_set_logits(logits, tokens, threshold, *, temperature=1.0, tolerance=KEPT_SET_TOLERANCE):
    """`logits` with every entry outside the kept set set to `-inf` (module docstring).

    Args:
      logits: `[..., V]` raw (unscaled) logits.
      tokens: `[...]` the drawn tokens (always kept).
      threshold: `[...]` float32 kept-set thresholds in units of `logits / T`.
      temperature: the sampling temperature `T`.
      tolerance: relative slack below the threshold (module docstring), >= 0.

    Returns:
      `[..., V]` float32 logits (unscaled), `-inf` outside the kept set; `token_logprobs` and
      `entropy_from_logits` of them (same `T`) score the kept distribution.
    """
    check_floating(logits, "logits")
    check_positive(temperature, "temperature")
    if tolerance < 0:
        raise ValueError(f"`tolerance` must be >= 0, got {tolerance}")
    if jnp.shape(threshold) != jnp.shape(logits)[:-1] or jnp.shape(tokens) != jnp.shape(logits)[:-1]:
        raise ValueError(f"`tokens` and `threshold` must have shape {jnp.shape(logits)[:-1]} (the "
                         f"leading axes of `logits`), got {jnp.shape(tokens)} and {jnp.shape(threshold)}")
    logits = jnp.asarray(logits, jnp.float32)
    scaled = logits / jnp.asarray(temperature, jnp.float32)
    drawn = jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)
    threshold = jnp.asarray(threshold, jnp.float32)[..., None]
    slack = tolerance * jnp.maximum(1.0, jnp.abs(jnp.where(jnp.isinf(threshold), 0.0, threshold)))
    cutoff = jnp.minimum(threshold - slack, drawn)
    return jnp.where(scaled >= cutoff, logits, -jnp.inf)


__all__ = ["KEPT_SET_TOLERANCE", "kept_set_logits"]
