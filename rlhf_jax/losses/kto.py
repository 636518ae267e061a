"""Kahneman-Tversky optimisation on unpaired desirable / undesirable completions."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_nonempty, check_positive, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_mean

__all__ = ["kto_loss"]


def kto_loss(
    policy_logps,
    ref_logps,
    is_desirable,
    *,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    kl_policy_logps=None,
    kl_ref_logps=None,
    axis_name=None,
):
    """KTO loss (Ethayarajh et al. 2024, arXiv:2402.01306).

    With the log-ratio `h = log pi(y|x) - log pi_ref(y|x)` of each row and the reference
    point `z0 = stop_gradient(max(mean(kl_policy_logps - kl_ref_logps), 0))`:

        desirable rows:    w_d * (1 - sigma(beta * (h - z0)))
        undesirable rows:  w_u * (1 - sigma(beta * (z0 - h)))

    and the loss is the mean over all rows. `z0` estimates `KL(pi || pi_ref)` from completions
    that do not belong to their prompts (the paper pairs each prompt with another row's
    completion); without those, the batch mean of `h` is used. The paper suggests choosing the
    weights so that `w_d * n_d / (w_u * n_u)` lies in [1, 4/3].

    Args:
      policy_logps: `[B]` summed completion log-probs under the policy.
      ref_logps: `[B]` summed completion log-probs under the reference model.
      is_desirable: `[B]` bool (or 0/1) label, true for desirable completions.
      beta: inverse temperature; > 0.
      desirable_weight: `w_d`.
      undesirable_weight: `w_u`.
      kl_policy_logps: `[K]` policy log-probs of mismatched (prompt, completion) pairs, or None.
      kl_ref_logps: `[K]` reference log-probs of the same mismatched pairs, or None.
      axis_name: optional mapped axis (`shard_map`/`pmap`) over which `z0` is averaged so
        every shard uses the global estimate.

    Returns:
      `(loss, metrics)` with `kto/loss`, `kto/kl` (z0), `kto/rewards_chosen` and
      `kto/rewards_rejected` (mean `beta*h` over desirable / undesirable rows, 0 when there
      are none), `kto/margin` (their difference), `kto/fraction_desirable`.
    """
    for name, value in (("policy_logps", policy_logps), ("ref_logps", ref_logps)):
        check_rank(value, 1, name)
        check_floating(value, name)
    check_rank(is_desirable, 1, "is_desirable")
    check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, is_desirable=is_desirable)
    check_nonempty(policy_logps, "policy_logps")
    check_positive(beta, "beta")
    if (kl_policy_logps is None) != (kl_ref_logps is None):
        raise ValueError("`kl_policy_logps` and `kl_ref_logps` must be given together or both be None")
    if kl_policy_logps is not None:
        for name, value in (("kl_policy_logps", kl_policy_logps), ("kl_ref_logps", kl_ref_logps)):
            check_rank(value, 1, name)
            check_floating(value, name)
        check_same_shape(kl_policy_logps=kl_policy_logps, kl_ref_logps=kl_ref_logps)

    dtype = jnp.promote_types(jnp.result_type(policy_logps, ref_logps), jnp.float32)
    logratios = jnp.asarray(policy_logps, dtype) - jnp.asarray(ref_logps, dtype)
    if kl_policy_logps is None:
        kl_estimate = jnp.mean(logratios)
    else:
        kl_estimate = jnp.mean(jnp.asarray(kl_policy_logps, dtype) - jnp.asarray(kl_ref_logps, dtype))
    if axis_name is not None:
        kl_estimate = jax.lax.pmean(kl_estimate, axis_name)
    reference_point = jax.lax.stop_gradient(jnp.maximum(kl_estimate, 0.0))

    desirable = jnp.asarray(is_desirable).astype(bool)
    desirable_losses = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (reference_point - logratios)))
    loss = jnp.mean(jnp.where(desirable, desirable_losses, undesirable_losses))

    rewards = jax.lax.stop_gradient(beta * logratios)
    rewards_chosen = masked_mean(rewards, desirable)
    rewards_rejected = masked_mean(rewards, ~desirable)
    metrics = {
        "kto/loss": loss,
        "kto/kl": reference_point,
        "kto/rewards_chosen": rewards_chosen,
        "kto/rewards_rejected": rewards_rejected,
        "kto/margin": rewards_chosen - rewards_rejected,
        "kto/fraction_desirable": jnp.mean(desirable.astype(dtype)),
    }
    return loss, metrics
