"""KL divergence between the policy and the reference model, per token.

Two views: Monte-Carlo estimators from the log-probabilities of the sampled tokens only
(`kl_estimate`, what PPO/GRPO reward shaping and penalties use), and the exact KL over the
whole vocabulary from both models' logits (`full_kl`, a diagnostic).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_in, check_positive, check_same_shape

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp, ref_logp, kind="k1"):
    """Per-token estimate of `KL(pi || pi_ref)` from the sampled tokens' log-probabilities.

    With `log_ratio = ref_logp - logp` (tokens sampled from `pi`), following J. Schulman,
    "Approximating KL divergence" (2020):

    - `k1 = -log_ratio = logp - ref_logp`: unbiased, high variance, can be negative;
    - `k2 = 0.5 * log_ratio**2`: biased, low variance, non-negative;
    - `k3 = exp(log_ratio) - 1 - log_ratio`: unbiased and non-negative (the GRPO penalty,
      Shao et al., 2024, arXiv:2402.03300).

    Args:
      logp: log-probabilities of the sampled tokens under the policy, any shape.
      ref_logp: the same tokens under the reference model, same shape.
      kind: `"k1"`, `"k2"` or `"k3"` (static).

    Returns:
      Elementwise estimates, same shape, at least float32.
    """
    check_in(kind, KL_ESTIMATORS, "kind")
    check_same_shape(logp=logp, ref_logp=ref_logp)
    check_floating(logp, "logp")
    check_floating(ref_logp, "ref_logp")
    dtype = jnp.promote_types(jnp.result_type(logp, ref_logp), jnp.float32)
    log_ratio = jnp.asarray(ref_logp, dtype) - jnp.asarray(logp, dtype)
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    return jnp.expm1(log_ratio) - log_ratio


def full_kl(logits, ref_logits, *, temperature=1.0):
    """Exact `KL(p || p_ref) = sum_v p_v (log p_v - log p_ref_v)` at every position.

    `p = softmax(logits / T)` and `p_ref = softmax(ref_logits / T)`, both in float32.
    Vocabulary entries with `p_v = 0` (e.g. `-inf` logits) contribute 0.

    Args:
      logits: `[B, T, V]` policy logits (any leading shape `[..., V]` works).
      ref_logits: reference-model logits, same shape.
      temperature: `T > 0`, a Python float or a traced scalar.

    Returns:
      `[B, T]` float32, non-negative up to rounding, exactly 0 for identical logits.
    """
    check_same_shape(logits=logits, ref_logits=ref_logits)
    check_floating(logits, "logits")
    check_floating(ref_logits, "ref_logits")
    if jnp.ndim(logits) < 1:
        raise ValueError(f"`logits` must have a vocabulary axis, got shape {jnp.shape(logits)}")
    check_positive(temperature, "temperature")
    if jnp.ndim(temperature) != 0:
        raise ValueError(f"`temperature` must be a scalar, got shape {jnp.shape(temperature)}")
    temperature = jnp.asarray(temperature, jnp.float32)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
    ref_logp = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32) / temperature, axis=-1)
    probs = jnp.exp(logp)
    # Where p_v = 0 the term is 0; swap in finite values so neither value nor gradient is NaN.
    support = probs > 0
    log_ratio = jnp.where(support, logp - jnp.where(support, ref_logp, 0.0), 0.0)
    return jnp.sum(probs * log_ratio, axis=-1)
