"""Vectorised environment rollouts as a `lax.scan`, with episode-return tracking.

`collect_rollout` steps `num_envs` gymnax environments (auto-resetting on episode end) for
`num_steps` steps with the current policy and returns the transitions time-major
(`[num_steps, num_envs]`); `time_last` turns them into the library's `[batch, time]` layout.

Episode ends: `done_t = terminated_t or truncated_t` (a time-limit cut counts as an end, so
GAE does not leak value across the reset). With `bootstrap_truncated`, a step that is cut
by the time limit without terminating gets `gamma * V(final observation)` added to its
reward, so the cut episode is still valued as if it went on (Pardo et al. 2018, "Time
Limits in Reinforcement Learning", arXiv:1712.00378).

Episode statistics come from a small tracker carried beside the environment state: it sums
raw rewards per environment and reports each episode's return and length on the step that
ends it.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import gymnax
import jax
import jax.numpy as jnp

from rlhf_jax.classic.networks import categorical_logp


@flax.struct.dataclass
class EpisodeTracker:
    running_return: jax.Array  # [E] undiscounted reward since the episode began
    running_length: jax.Array  # [E] steps since the episode began


@flax.struct.dataclass
class EnvCarry:
    obs: jax.Array             # [E, obs_dim] observation the next action is chosen from
    env_state: Any             # gymnax state, leaves batched over E
    tracker: EpisodeTracker


@flax.struct.dataclass
class Transition:
    obs: jax.Array               # [..., obs_dim] observation the action was chosen from
    action: jax.Array            # [...] int32
    logp: jax.Array              # [...] log pi(action | obs) under the rollout policy
    value: jax.Array             # [...] V(obs) under the rollout critic (0 without a critic)
    reward: jax.Array            # [...] reward used for learning (bootstrapped on truncation)
    done: jax.Array              # [...] float32, 1 when the episode ended at this step
    episode_return: jax.Array    # [...] return of the episode that ended here, else 0
    episode_length: jax.Array    # [...] length of the episode that ended here, else 0


def make_env(env_name: str):
    """`(env, env_params)` from `gymnax.make`."""
    return gymnax.make(env_name)


def init_episode_tracker(num_envs: int) -> EpisodeTracker:
    return EpisodeTracker(running_return=jnp.zeros((num_envs,), jnp.float32),
                          running_length=jnp.zeros((num_envs,), jnp.int32))


def track_episodes(tracker: EpisodeTracker, reward, done):
    """Add one step's `reward` [E]; where `done` [E], report and restart the episode.

    Returns `(tracker, episode_return, episode_length)`, the last two nonzero only where
    an episode ended at this step.
    """
    total = tracker.running_return + reward.astype(jnp.float32)
    length = tracker.running_length + 1
    done = done.astype(bool)
    new_tracker = EpisodeTracker(running_return=jnp.where(done, 0.0, total),
                                 running_length=jnp.where(done, 0, length))
    return new_tracker, jnp.where(done, total, 0.0), jnp.where(done, length, 0)


def reset_envs(rng, env, env_params, num_envs: int) -> EnvCarry:
    """Reset `num_envs` environments with independent keys."""
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(rng, num_envs),
                                                            env_params)
    return EnvCarry(obs=obs, env_state=env_state, tracker=init_episode_tracker(num_envs))


def _step_envs(rng, env, env_params, env_state, action):
    """Vectorised gymnax step -> (obs, state, reward, terminated, truncated, final_obs)."""
    keys = jax.random.split(rng, action.shape[0])
    out = jax.vmap(env.step, in_axes=(0, 0, 0, None))(keys, env_state, action, env_params)
    if len(out) == 6:  # gymnax >= 1.0 separates termination from time-limit truncation
        obs, env_state, reward, terminated, truncated, info = out
        final_obs = info.get("final_observation", obs)
    else:  # older gymnax: one `done` flag, no final observation
        obs, env_state, reward, terminated, info = out
        truncated = jnp.zeros_like(terminated)
        final_obs = obs
    return obs, env_state, reward, terminated.astype(bool), truncated.astype(bool), final_obs


def collect_rollout(rng, carry: EnvCarry, actor_state, critic_state, *, env, env_params,
                    num_steps: int, gamma: float, bootstrap_truncated: bool = True):
    """Run the policy for `num_steps` steps in every environment.

    Args:
      rng: PRNG key for action sampling and environment steps.
      carry: environment observations, states and episode trackers.
      actor_state: TrainState whose `apply_fn(params, obs)` gives logits `[E, A]`.
      critic_state: TrainState whose `apply_fn(params, obs)` gives values `[E]`, or None
        (values are then 0 and truncated episodes are not bootstrapped).
      env, env_params: a gymnax environment and its parameters.
      num_steps: rollout length T (static).
      gamma: discount, used only for the truncation bootstrap.
      bootstrap_truncated: add `gamma * V(final_obs)` to the reward of time-limit cuts.

    Returns:
      `(carry, transitions, last_value)`: transitions time-major `[T, E]`, and
      `last_value` `[E]` = V(observation after the last step), the GAE bootstrap.
    """

    def value_of(obs):
        if critic_state is None:
            return jnp.zeros(obs.shape[:1], jnp.float32)
        return critic_state.apply_fn(critic_state.params, obs)

    def step(state, step_rng):
        carry = state
        action_rng, env_rng = jax.random.split(step_rng)
        logits = actor_state.apply_fn(actor_state.params, carry.obs)  # [E, A]
        action = jax.random.categorical(action_rng, logits).astype(jnp.int32)  # [E]
        logp = categorical_logp(logits, action)
        value = value_of(carry.obs)
        obs, env_state, reward, terminated, truncated, final_obs = _step_envs(
            env_rng, env, env_params, carry.env_state, action)
        reward = reward.astype(jnp.float32)
        done = terminated | truncated
        learn_reward = reward
        if bootstrap_truncated and critic_state is not None:
            cut = truncated & ~terminated
            learn_reward = reward + gamma * jnp.where(cut, value_of(final_obs), 0.0)
        tracker, episode_return, episode_length = track_episodes(carry.tracker, reward, done)
        transition = Transition(obs=carry.obs, action=action, logp=logp, value=value,
                                reward=learn_reward, done=done.astype(jnp.float32),
                                episode_return=episode_return, episode_length=episode_length)
        return EnvCarry(obs=obs, env_state=env_state, tracker=tracker), transition

    carry, transitions = jax.lax.scan(step, carry, jax.random.split(rng, num_steps))
    return carry, transitions, value_of(carry.obs)


def time_last(transitions: Transition) -> Transition:
    """`[T, E, ...]` -> `[E, T, ...]`, the `[batch, time]` layout of `gae` and the losses."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), transitions)


def episode_summary(transitions: Transition) -> dict:
    """Scalars over the episodes that ended in this rollout.

    `episode/return` and `episode/length` are means over those episodes (NaN when none
    ended); `episode/return_sum` and `episode/count` let callers average over any window.
    """
    done = transitions.done
    count = jnp.sum(done)
    return_sum = jnp.sum(transitions.episode_return)
    length_sum = jnp.sum(transitions.episode_length.astype(jnp.float32))
    nan = jnp.float32(jnp.nan)
    safe = jnp.maximum(count, 1.0)
    return {
        "episode/return": jnp.where(count > 0, return_sum / safe, nan),
        "episode/length": jnp.where(count > 0, length_sum / safe, nan),
        "episode/return_sum": return_sum,
        "episode/count": count,
    }


def complete_episode_mask(dones):
    """1 where the step's episode ends inside the rollout: `mask_t = any(done_{t..T-1})`.

    `dones` is `[batch, time]`; steps of each row's trailing unfinished episode get 0.
    """
    later_dones = jnp.flip(jnp.cumsum(jnp.flip(dones, axis=-1), axis=-1), axis=-1)
    return (later_dones > 0).astype(jnp.float32)
