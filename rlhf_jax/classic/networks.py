"""Separate policy (actor) and value (critic) MLPs for discrete-action environments.

Two tanh hidden layers with orthogonal initialisation: gain sqrt(2) on hidden layers, 0.01 on
the policy head (near-uniform initial policy) and 1.0 on the value head, biases zero
(Engstrom et al. 2020, "Implementation Matters in Deep Policy Gradients", arXiv:2005.12729;
Andrychowicz et al. 2020, arXiv:2006.05990). Each network has its own TrainState with
`clip_by_global_norm -> adam(eps=1e-5)` and an optional linear learning-rate decay.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState


def _dense(features: int, gain: float) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.orthogonal(gain),
                    bias_init=nn.initializers.zeros)


def _tanh_trunk(obs, hidden_size: int):
    """Two tanh layers `[..., obs_dim] -> [..., H]`, orthogonal init with gain sqrt(2).

    Called inside a compact `__call__`, so its layers are the caller's `Dense_0`, `Dense_1`.
    """
    x = obs.astype(jnp.float32)
    x = nn.tanh(_dense(hidden_size, math.sqrt(2.0))(x))
    return nn.tanh(_dense(hidden_size, math.sqrt(2.0))(x))


class ActorMLP(nn.Module):
    """Observation `[..., obs_dim]` -> action logits `[..., num_actions]` (float32)."""

    num_actions: int
    hidden_size: int = 64

    @nn.compact
    def __call__(self, obs):
        hidden = _tanh_trunk(obs, self.hidden_size)  # [..., H]
        return _dense(self.num_actions, 0.01)(hidden)  # [..., A]


class CriticMLP(nn.Module):
    """Observation `[..., obs_dim]` -> state value `[...]` (float32)."""

    hidden_size: int = 64

    @nn.compact
    def __call__(self, obs):
        hidden = _tanh_trunk(obs, self.hidden_size)  # [..., H]
        return _dense(1, 1.0)(hidden)[..., 0]  # [...]


def make_optimizer(*, lr: float, max_grad_norm: float, anneal_lr: bool = False,
                   total_steps: int = 1) -> optax.GradientTransformation:
    """`clip_by_global_norm(max_grad_norm) -> adam(lr, eps=1e-5)`.

    With `anneal_lr` the learning rate falls linearly from `lr` to 0 over `total_steps`
    optimizer steps (epochs x minibatches x updates).
    """
    learning_rate = optax.linear_schedule(lr, 0.0, total_steps) if anneal_lr else lr
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adam(learning_rate, eps=1e-5))


def create_train_states(rng, *, obs_shape: tuple[int, ...], num_actions: int, hidden_size: int,
                        optimizer: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
    """Initialise `(actor_state, critic_state)`, each with its own copy of `optimizer`'s state."""
    actor_rng, critic_rng = jax.random.split(rng)
    dummy_obs = jnp.zeros(obs_shape, jnp.float32)
    actor = ActorMLP(num_actions=num_actions, hidden_size=hidden_size)
    critic = CriticMLP(hidden_size=hidden_size)
    actor_state = TrainState.create(apply_fn=actor.apply, params=actor.init(actor_rng, dummy_obs),
                                    tx=optimizer)
    critic_state = TrainState.create(apply_fn=critic.apply,
                                     params=critic.init(critic_rng, dummy_obs), tx=optimizer)
    return actor_state, critic_state


def categorical_logp(logits, actions):
    """`log softmax(logits)[action]` in float32: logits `[..., A]`, actions `[...]` -> `[...]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]
