"""The whole classic-RL training run as one pure function of an RNG key.

`make_train(config)` returns `train(rng) -> (runner_state, metrics)`: `num_updates` times
[collect a rollout (scan over steps of vectorised environments) -> advantages/returns ->
epochs x shuffled minibatches (nested scans)], itself a `lax.scan`. Every size is computed
from the config before tracing, so

    jax.jit(make_train(config))(rng)                       # one seed
    jax.jit(jax.vmap(make_train(config)))(rngs)            # many seeds at once

compile once. `make_train_parts` exposes the same run as `init(rng)` and
`update(runner_state, _)` so a driver can run it in jitted chunks and report progress.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.classic.config import ClassicConfig, derived_sizes
from rlhf_jax.classic.networks import create_train_states, make_optimizer
from rlhf_jax.classic.ppo import ppo_update
from rlhf_jax.classic.reinforce import reinforce_update
from rlhf_jax.classic.rollout import (EnvCarry, collect_rollout, episode_summary, make_env,
                                      reset_envs, time_last)


@flax.struct.dataclass
class RunnerState:
    actor_state: Any          # TrainState of the policy network
    critic_state: Any         # TrainState of the value network, None for REINFORCE without baseline
    env: EnvCarry             # observations, environment states, episode trackers
    rng: jax.Array
    update_count: jax.Array   # updates done so far (int32 scalar)


def uses_critic(config: ClassicConfig) -> bool:
    return config.algorithm == "ppo" or config.baseline


def make_train_parts(config: ClassicConfig) -> tuple[Callable, Callable]:
    """`(init, update)`: `init(rng) -> RunnerState` and
    `update(runner_state, _) -> (runner_state, metrics)` (one rollout + one update, scan-ready)."""
    sizes = derived_sizes(config)
    env, env_params = make_env(config.env_name)
    num_actions = env.action_space(env_params).n
    obs_shape = env.observation_space(env_params).shape
    optimizer = make_optimizer(lr=config.learning_rate, max_grad_norm=config.max_grad_norm,
                               anneal_lr=config.anneal_lr, total_steps=sizes.optimizer_steps)
    with_critic = uses_critic(config)
    algorithm_update = ppo_update if config.algorithm == "ppo" else reinforce_update

    def init(rng) -> RunnerState:
        rng, net_rng, env_rng = jax.random.split(rng, 3)
        actor_state, critic_state = create_train_states(
            net_rng, obs_shape=obs_shape, num_actions=num_actions,
            hidden_size=config.hidden_size, optimizer=optimizer)
        return RunnerState(actor_state=actor_state,
                           critic_state=critic_state if with_critic else None,
                           env=reset_envs(env_rng, env, env_params, config.num_envs),
                           rng=rng, update_count=jnp.zeros((), jnp.int32))

    def update(runner: RunnerState, _=None):
        rng, rollout_rng, update_rng = jax.random.split(runner.rng, 3)
        env_carry, transitions, last_value = collect_rollout(
            rollout_rng, runner.env, runner.actor_state, runner.critic_state, env=env,
            env_params=env_params, num_steps=config.num_steps, gamma=config.gamma,
            bootstrap_truncated=config.bootstrap_truncated)
        transitions = time_last(transitions)  # [E, T]
        actor_state, critic_state, metrics = algorithm_update(
            update_rng, runner.actor_state, runner.critic_state, transitions, last_value,
            config=config)
        update_count = runner.update_count + 1
        metrics = {**metrics, **episode_summary(transitions),
                   "env_steps": update_count * sizes.batch_size}
        return RunnerState(actor_state=actor_state, critic_state=critic_state, env=env_carry,
                           rng=rng, update_count=update_count), metrics

    return init, update


def make_train(config: ClassicConfig) -> Callable:
    """`train(rng) -> (runner_state, metrics)`, metrics holding one entry per update.

    Metrics include `episode/return` (mean return of the episodes that ended in that
    update's rollout, NaN when none did), `episode/return_sum`, `episode/count`,
    `episode/length`, `env_steps` and the loss terms (`loss/total`, `loss/policy`,
    `loss/value`, `loss/entropy`, plus each loss's own metrics).
    """
    sizes = derived_sizes(config)
    init, update = make_train_parts(config)

    def train(rng):
        runner = init(rng)
        return jax.lax.scan(update, runner, None, length=sizes.num_updates)

    return train
