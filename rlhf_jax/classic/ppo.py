"""PPO update on one environment rollout (Schulman et al. 2017, arXiv:1707.06347).

Advantages by GAE over episode boundaries (Schulman et al. 2016, arXiv:1506.02438):
`delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t`,
`A_t = delta_t + gamma * gae_lambda * (1 - done_t) * A_{t+1}`, with V after the last step the
critic's value of the next observation; returns `R_t = A_t + V_t` are the value targets.

Then `epochs` passes of shuffled minibatches, each minimising
`L = L_clip(policy) + vf_coef * L_value + ent_coef * (-entropy)` with the library's
`ppo_policy_loss`, `value_loss` and `entropy_loss`; the policy and value networks are
separate and each takes its own optimizer step on its part of the gradient.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.classic.config import ClassicConfig, combine_losses
from rlhf_jax.classic.minibatches import flatten_batch, run_epochs
from rlhf_jax.classic.networks import categorical_logp
from rlhf_jax.classic.rollout import Transition
from rlhf_jax.losses.entropy import entropy_loss
from rlhf_jax.losses.policy import ppo_policy_loss
from rlhf_jax.losses.value import value_loss
from rlhf_jax.ops.advantages import gae
from rlhf_jax.ops.masking import masked_whiten


@flax.struct.dataclass
class PPOBatch:
    obs: jax.Array          # [N, obs_dim]
    action: jax.Array       # [N]
    old_logp: jax.Array     # [N] rollout-policy log-probs
    old_value: jax.Array    # [N] rollout-critic values
    advantage: jax.Array    # [N]
    target: jax.Array       # [N] value targets (GAE returns)


def rollout_advantages(transitions: Transition, last_value, *, gamma: float, gae_lambda: float):
    """GAE `(advantages, returns)` `[E, T]` from `[E, T]` transitions and `last_value` `[E]`."""
    return gae(transitions.reward, transitions.value, None, gamma=gamma, gae_lambda=gae_lambda,
               dones=transitions.done, bootstrap_value=last_value)


def ppo_loss(actor_params, critic_params, batch: PPOBatch, *, actor_apply, critic_apply,
             config: ClassicConfig):
    """Total PPO loss on a flat minibatch `[N]` and its metrics."""
    row = lambda x: x[None]  # [N] -> [1, N]: one "sequence" of N counted steps
    ones = jnp.ones((1, batch.action.shape[0]), jnp.float32)
    logits = actor_apply(actor_params, batch.obs)  # [N, A]
    logp = categorical_logp(logits, batch.action)
    advantage = row(batch.advantage)
    if config.whiten_advantages:
        advantage = masked_whiten(advantage, ones)
    policy_loss, policy_metrics = ppo_policy_loss(row(logp), row(batch.old_logp), advantage, ones,
                                                  clip_eps=config.clip_eps)
    values = critic_apply(critic_params, batch.obs)  # [N]
    critic_loss, critic_metrics = value_loss(row(values), row(batch.old_value), row(batch.target),
                                             ones, value_clip_eps=config.value_clip_eps)
    neg_entropy, entropy_metrics = entropy_loss(logits[None], ones)
    return combine_losses(config, policy_loss, critic_loss, neg_entropy,
                          policy_metrics, critic_metrics, entropy_metrics)


def ppo_update(rng, actor_state, critic_state, transitions: Transition, last_value, *,
               config: ClassicConfig):
    """One PPO update from a `[E, T]` rollout.

    Returns `(actor_state, critic_state, metrics)`, metrics averaged over the minibatch steps.
    """
    advantages, returns = rollout_advantages(transitions, last_value, gamma=config.gamma,
                                             gae_lambda=config.gae_lambda)
    batch = flatten_batch(PPOBatch(obs=transitions.obs, action=transitions.action,
                                   old_logp=transitions.logp, old_value=transitions.value,
                                   advantage=advantages, target=returns))
    grad_fn = jax.value_and_grad(ppo_loss, argnums=(0, 1), has_aux=True)

    def minibatch_step(states, minibatch):
        actor_state, critic_state = states
        (_, metrics), (actor_grads, critic_grads) = grad_fn(
            actor_state.params, critic_state.params, minibatch, actor_apply=actor_state.apply_fn,
            critic_apply=critic_state.apply_fn, config=config)
        return (actor_state.apply_gradients(grads=actor_grads),
                critic_state.apply_gradients(grads=critic_grads)), metrics

    (actor_state, critic_state), metrics = run_epochs(
        rng, (actor_state, critic_state), batch, num_epochs=config.epochs,
        num_minibatches=config.num_minibatches, minibatch_step=minibatch_step)
    metrics["advantage/mean"] = jnp.mean(advantages)
    metrics["value/target_mean"] = jnp.mean(returns)
    return actor_state, critic_state, metrics
