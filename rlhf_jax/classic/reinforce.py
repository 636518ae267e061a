"""REINFORCE update on one environment rollout (Williams 1992), optionally with a learned
value baseline (Sutton & Barto 2018, section 13.4).

Returns are Monte Carlo: `G_t = r_t + gamma * (1 - done_t) * G_{t+1}` over the episodes that
end inside the rollout. The trailing unfinished episode of each environment has no complete
return, so its steps are masked out of every loss (`complete_episode_mask`); nothing is
bootstrapped from the critic there, which keeps the estimator unbiased. (With
`bootstrap_truncated` and a baseline, a time-limit cut still adds `gamma * V(final obs)` to
its last reward, see `rollout.py`.)

Loss on the counted steps:
`-mean(logp_t * (G_t - b_t)) + vf_coef * 0.5 * mean((V(s_t) - G_t)^2) - ent_coef * entropy`,
with `b_t = stop_gradient(V(s_t))` when `baseline` is on and 0 otherwise, and
`G_t - b_t` whitened over the minibatch when `whiten_advantages` is on.
Use `epochs = num_minibatches = 1` for the textbook on-policy estimator: later
minibatch steps reuse samples from an older policy without an importance ratio.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.classic.config import ClassicConfig, combine_losses
from rlhf_jax.classic.minibatches import flatten_batch, run_epochs
from rlhf_jax.classic.networks import categorical_logp
from rlhf_jax.classic.rollout import Transition, complete_episode_mask
from rlhf_jax.losses.entropy import entropy_loss
from rlhf_jax.losses.reinforce import reinforce_loss
from rlhf_jax.losses.value import value_loss
from rlhf_jax.ops.advantages import discounted_returns


@flax.struct.dataclass
class ReinforceBatch:
    obs: jax.Array      # [N, obs_dim]
    action: jax.Array   # [N]
    target: jax.Array   # [N] Monte Carlo discounted return G_t
    mask: jax.Array     # [N] 1 on steps of episodes that ended inside the rollout


def rollout_returns(transitions: Transition, *, gamma: float):
    """`(returns, mask)` `[E, T]`: discounted returns and the complete-episode mask."""
    returns = discounted_returns(transitions.reward, None, gamma=gamma, dones=transitions.done)
    return returns, complete_episode_mask(transitions.done)


def reinforce_objective(actor_params, critic_params, batch: ReinforceBatch, *, actor_apply,
                        critic_apply, config: ClassicConfig):
    """Total REINFORCE loss on a flat minibatch `[N]` and its metrics."""
    row = lambda x: x[None]  # [N] -> [1, N]
    mask = row(batch.mask)
    logits = actor_apply(actor_params, batch.obs)  # [N, A]
    logp = categorical_logp(logits, batch.action)
    baseline = None
    critic_loss = jnp.float32(0.0)
    critic_metrics = {}
    if critic_apply is not None:
        values = critic_apply(critic_params, batch.obs)  # [N]
        baseline = row(jax.lax.stop_gradient(values))
        critic_loss, critic_metrics = value_loss(row(values), None, row(batch.target), mask,
                                                 value_clip_eps=None)
    policy_loss, policy_metrics = reinforce_loss(row(logp), row(batch.target), mask,
                                                 baseline=baseline,
                                                 normalize=config.whiten_advantages)
    neg_entropy, entropy_metrics = entropy_loss(logits[None], mask)
    return combine_losses(config, policy_loss, critic_loss, neg_entropy,
                          policy_metrics, critic_metrics, entropy_metrics)


def reinforce_update(rng, actor_state, critic_state, transitions: Transition, last_value=None, *,
                     config: ClassicConfig):
    """One REINFORCE update from a `[E, T]` rollout; `critic_state` is None without a baseline.

    `last_value` is accepted for a common signature with `ppo_update` and not used.
    Returns `(actor_state, critic_state, metrics)`.
    """
    del last_value
    returns, mask = rollout_returns(transitions, gamma=config.gamma)
    batch = flatten_batch(ReinforceBatch(obs=transitions.obs, action=transitions.action,
                                         target=returns, mask=mask))
    with_critic = critic_state is not None
    grad_fn = jax.value_and_grad(reinforce_objective, argnums=(0, 1), has_aux=True)

    def minibatch_step(states, minibatch):
        actor_state, critic_state = states
        (_, metrics), (actor_grads, critic_grads) = grad_fn(
            actor_state.params, critic_state.params if with_critic else None, minibatch,
            actor_apply=actor_state.apply_fn,
            critic_apply=critic_state.apply_fn if with_critic else None, config=config)
        actor_state = actor_state.apply_gradients(grads=actor_grads)
        if with_critic:
            critic_state = critic_state.apply_gradients(grads=critic_grads)
        return (actor_state, critic_state), metrics

    (actor_state, critic_state), metrics = run_epochs(
        rng, (actor_state, critic_state), batch, num_epochs=config.epochs,
        num_minibatches=config.num_minibatches, minibatch_step=minibatch_step)
    metrics["reinforce/counted_fraction"] = jnp.mean(mask)
    metrics["value/target_mean"] = jnp.sum(returns * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return actor_state, critic_state, metrics
