"""Rollout -> episode tracking -> GAE / returns plumbing, against NumPy oracles.

A tiny deterministic environment (a walk on a line) produces episodes that end by
termination, by time-limit truncation, and by both at once; the oracle replays the
recorded actions, recomputes every step, and evaluates GAE and discounted returns with
plain loops written from the formulas in docs/numerics.md.
"""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.classic.ppo import rollout_advantages
from rlhf_jax.classic.reinforce import rollout_returns
from rlhf_jax.classic.rollout import (
    Transition,
    collect_rollout,
    complete_episode_mask,
    episode_summary,
    init_episode_tracker,
    make_env,
    reset_envs,
    time_last,
    track_episodes,
)

STEP_SIZE = 0.5
MAX_STEPS = 4  # even, so an episode can terminate and be truncated on the same step


class LineWalkEnv:
    """Position x moves by +-0.5 per action; reward 1 + 0.25 x (fractional); terminated when
    |x| reaches 1, truncated at MAX_STEPS steps; auto-resets like gymnax >= 1.0."""

    def reset(self, key, params=None):
        state = {"x": jnp.float32(0.0), "t": jnp.int32(0)}
        return self._obs(state), state

    @staticmethod
    def _obs(state):
        return jnp.stack([state["x"], state["t"].astype(jnp.float32)])

    def step(self, key, state, action, params=None):
        x = state["x"] + (2.0 * action - 1.0) * STEP_SIZE
        t = state["t"] + 1
        reward = 1.0 + 0.25 * x
        terminated = jnp.abs(x) >= 1.0 - 1e-6
        truncated = t >= MAX_STEPS
        done = terminated | truncated
        stepped = {"x": x, "t": t}
        final_obs = self._obs(stepped)
        reset_obs, reset_state = self.reset(key)
        next_state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, stepped)
        obs = jnp.where(done, reset_obs, final_obs)
        return obs, next_state, reward, terminated, truncated, {"final_observation": final_obs}


class LegacyLineWalkEnv(LineWalkEnv):
    """The same walk with the older gymnax step signature: one `done`, no final observation."""

    def step(self, key, state, action, params=None):
        obs, state, reward, terminated, truncated, _ = super().step(key, state, action, params)
        return obs, state, reward, terminated | truncated, {}


CRITIC_WEIGHTS = np.array([0.7, -0.3], np.float32)
CRITIC_BIAS = 0.4


def fake_states():
    actor = SimpleNamespace(
        params={"w": jnp.array([[0.8, -0.5], [0.2, 0.3]], jnp.float32)},
        apply_fn=lambda params, obs: obs @ params["w"])
    critic = SimpleNamespace(
        params={"w": jnp.asarray(CRITIC_WEIGHTS), "b": jnp.float32(CRITIC_BIAS)},
        apply_fn=lambda params, obs: obs @ params["w"] + params["b"])
    return actor, critic


def oracle_value(obs):
    return float(np.dot(obs, CRITIC_WEIGHTS) + CRITIC_BIAS)


def simulate(actions, gamma, bootstrap_truncated):
    """Replay `actions` [T, E] from reset; per-step arrays [T, E] and the next observation."""
    steps, envs = actions.shape
    out = {k: np.zeros((steps, envs)) for k in
           ("reward", "learn_reward", "done", "value", "episode_return", "episode_length",
            "end_kind")}
    out["obs"] = np.zeros((steps, envs, 2))
    last_obs = np.zeros((envs, 2))
    for env in range(envs):
        x, t, running, length = 0.0, 0, 0.0, 0
        for step in range(steps):
            obs = np.array([x, t], np.float64)
            out["obs"][step, env] = obs
            out["value"][step, env] = oracle_value(obs)
            x = x + (2 * actions[step, env] - 1) * STEP_SIZE
            t += 1
            reward = 1.0 + 0.25 * x
            terminated, truncated = abs(x) >= 1.0 - 1e-6, t >= MAX_STEPS
            learn_reward = reward
            if bootstrap_truncated and truncated and not terminated:
                learn_reward += gamma * oracle_value(np.array([x, t]))
            running, length = running + reward, length + 1
            out["reward"][step, env], out["learn_reward"][step, env] = reward, learn_reward
            if terminated or truncated:
                out["done"][step, env] = 1.0
                out["end_kind"][step, env] = 1 * terminated + 2 * truncated
                out["episode_return"][step, env], out["episode_length"][step, env] = running, length
                x, t, running, length = 0.0, 0, 0.0, 0
        last_obs[env] = [x, t]
    return out, last_obs


def oracle_gae(rewards, values, dones, bootstrap, gamma, gae_lambda):
    """[E, T] loops: delta_t = r_t + g V_{t+1} (1-d_t) - V_t; A_t = delta_t + g l (1-d_t) A_{t+1}."""
    envs, steps = rewards.shape
    advantages = np.zeros((envs, steps))
    for env in range(envs):
        next_advantage, next_value = 0.0, bootstrap[env]
        for t in reversed(range(steps)):
            not_done = 1.0 - dones[env, t]
            delta = rewards[env, t] + gamma * next_value * not_done - values[env, t]
            next_advantage = delta + gamma * gae_lambda * not_done * next_advantage
            advantages[env, t] = next_advantage
            next_value = values[env, t]
    return advantages, advantages + values


def oracle_returns(rewards, dones, gamma):
    envs, steps = rewards.shape
    returns, complete = np.zeros((envs, steps)), np.zeros((envs, steps))
    for env in range(envs):
        running, ended = 0.0, False
        for t in reversed(range(steps)):
            if dones[env, t]:
                running, ended = 0.0, True
            running = rewards[env, t] + gamma * running
            returns[env, t], complete[env, t] = running, float(ended)
    return returns, complete


def run_fake_rollouts(gamma, bootstrap_truncated, num_envs=5, num_steps=7, jit=True,
                      env=None):
    env = LineWalkEnv() if env is None else env
    actor, critic = fake_states()
    carry = reset_envs(jax.random.PRNGKey(0), env, None, num_envs)

    def rollout(rng, carry):
        return collect_rollout(rng, carry, actor, critic, env=env, env_params=None,
                               num_steps=num_steps, gamma=gamma,
                               bootstrap_truncated=bootstrap_truncated)

    rollout = jax.jit(rollout) if jit else rollout
    carry, first, _ = rollout(jax.random.PRNGKey(1), carry)
    carry, second, last_value = rollout(jax.random.PRNGKey(2), carry)
    return first, second, last_value


@pytest.mark.parametrize("gamma,gae_lambda,bootstrap_truncated,jit",
                         [(0.99, 0.95, True, True), (0.9, 0.5, False, True),
                          (0.8, 1.0, True, False)])
def test_rollout_matches_replayed_oracle(gamma, gae_lambda, bootstrap_truncated, jit):
    first, second, last_value = run_fake_rollouts(gamma, bootstrap_truncated, jit=jit)
    actions = np.concatenate([np.asarray(first.action), np.asarray(second.action)])  # [2T, E]
    expected, last_obs = simulate(actions, gamma, bootstrap_truncated)
    steps = first.action.shape[0]
    got = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), first, second)
    # The episodes must exercise every kind of end for the test to mean anything.
    # 1 terminated, 2 truncated, 3 both at once.
    assert set(np.unique(expected["end_kind"])) == {0, 1, 2, 3}
    np.testing.assert_allclose(got.obs, expected["obs"], atol=1e-6)
    np.testing.assert_allclose(got.reward, expected["learn_reward"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.done, expected["done"])
    np.testing.assert_allclose(got.value, expected["value"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.episode_return, expected["episode_return"], rtol=1e-6)
    np.testing.assert_allclose(got.episode_length, expected["episode_length"])
    np.testing.assert_allclose(last_value, [oracle_value(o) for o in last_obs], rtol=1e-6)
    logits = np.asarray(got.obs) @ np.array([[0.8, -0.5], [0.2, 0.3]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got.logp, np.take_along_axis(log_probs, actions[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-6)

    # GAE over the second rollout: [T, E] -> [E, T], bootstrap from the next observation.
    batch = time_last(second)
    advantages, returns = rollout_advantages(batch, last_value, gamma=gamma, gae_lambda=gae_lambda)
    want_adv, want_ret = oracle_gae(expected["learn_reward"][steps:].T, expected["value"][steps:].T,
                                    expected["done"][steps:].T,
                                    np.array([oracle_value(o) for o in last_obs]), gamma, gae_lambda)
    np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)

    mc_returns, complete = rollout_returns(batch, gamma=gamma)
    want_mc, want_complete = oracle_returns(expected["learn_reward"][steps:].T,
                                            expected["done"][steps:].T, gamma)
    np.testing.assert_allclose(complete, want_complete)
    np.testing.assert_allclose(np.asarray(mc_returns) * want_complete, want_mc * want_complete,
                               rtol=1e-5, atol=1e-5)


def test_older_gymnax_step_signature_counts_every_end_without_bootstrap():
    first, second, _ = run_fake_rollouts(0.9, True, env=LegacyLineWalkEnv())
    actions = np.concatenate([np.asarray(first.action), np.asarray(second.action)])
    expected, _ = simulate(actions, 0.9, bootstrap_truncated=False)
    got = jax.tree.map(lambda a, b: np.concatenate([np.asarray(a), np.asarray(b)]), first, second)
    np.testing.assert_allclose(got.done, expected["done"])
    np.testing.assert_allclose(got.reward, expected["reward"], rtol=1e-6)
    np.testing.assert_allclose(got.episode_return, expected["episode_return"], rtol=1e-6)


def test_gae_uses_bootstrap_only_after_last_episode_end():
    """Hand-made [E=2, T=5] rollout: env 0 ends at t=1 and runs on; env 1 ends at t=4."""
    rewards = np.array([[1.0, 0.5, 2.0, -1.0, 0.25], [0.3, 0.3, 0.3, 0.3, 0.3]], np.float32)
    values = np.array([[0.2, 0.1, 0.4, -0.3, 0.6], [1.0, 0.9, 0.8, 0.7, 0.6]], np.float32)
    dones = np.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], np.float32)
    zeros = np.zeros_like(rewards, dtype=np.int32)
    batch = Transition(obs=zeros, action=zeros, logp=rewards, value=values, reward=rewards,
                       done=dones, episode_return=rewards, episode_length=zeros)
    outputs = {}
    for bootstrap in ([0.0, 0.0], [5.0, 5.0]):
        adv, ret = rollout_advantages(batch, jnp.asarray(bootstrap, jnp.float32), gamma=0.9, gae_lambda=0.8)
        want_adv, want_ret = oracle_gae(rewards, values, dones, np.asarray(bootstrap), 0.9, 0.8)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-6)
        outputs[bootstrap[0]] = np.asarray(adv)
    changed = ~np.isclose(outputs[0.0], outputs[5.0])
    # Only env 0's steps after its episode end (t >= 2) see the bootstrap value.
    np.testing.assert_array_equal(changed, [[False, False, True, True, True], [False] * 5])


def test_track_episodes_by_hand():
    tracker = init_episode_tracker(2)
    rewards = [[1.0, 0.5], [2.0, 0.5], [0.25, 0.5], [1.0, 0.5]]
    dones = [[0, 0], [1, 0], [0, 1], [1, 0]]
    seen_returns, seen_lengths = [], []
    for reward, done in zip(rewards, dones):
        tracker, episode_return, episode_length = track_episodes(
            tracker, jnp.asarray(reward), jnp.asarray(done, bool))
        seen_returns.append(np.asarray(episode_return))
        seen_lengths.append(np.asarray(episode_length))
    np.testing.assert_allclose(seen_returns, [[0, 0], [3.0, 0], [0, 1.5], [1.25, 0]])
    np.testing.assert_array_equal(seen_lengths, [[0, 0], [2, 0], [0, 3], [2, 0]])
    np.testing.assert_allclose(tracker.running_return, [0.0, 0.5])
    np.testing.assert_array_equal(tracker.running_length, [0, 1])


def test_episode_summary_and_complete_mask():
    done = jnp.array([[0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]], jnp.float32)
    episode_return = jnp.array([[0, 3.0, 0, 0], [0, 0, 0, 0], [2.0, 0, 4.0, 0]])
    zeros = jnp.zeros_like(done)
    batch = Transition(obs=zeros, action=zeros, logp=zeros, value=zeros, reward=zeros, done=done,
                       episode_return=episode_return, episode_length=(done * 2).astype(jnp.int32))
    summary = episode_summary(batch)
    assert float(summary["episode/count"]) == 3
    assert float(summary["episode/return"]) == pytest.approx(3.0)
    assert float(summary["episode/length"]) == pytest.approx(2.0)
    empty = episode_summary(jax.tree.map(jnp.zeros_like, batch))
    assert np.isnan(empty["episode/return"]) and float(empty["episode/count"]) == 0
    np.testing.assert_array_equal(complete_episode_mask(done),
                                  [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])


def test_cartpole_random_rollout_tracks_episodes():
    """CartPole pays 1 per step, so every finished episode's return equals its length."""
    env, params = make_env("CartPole-v1")
    actor = SimpleNamespace(params=None, apply_fn=lambda p, obs: jnp.zeros(obs.shape[:1] + (2,)))
    carry = reset_envs(jax.random.PRNGKey(3), env, params, 4)
    rollout = jax.jit(lambda rng, carry: collect_rollout(
        rng, carry, actor, None, env=env, env_params=params, num_steps=200, gamma=0.99))
    carry, transitions, last_value = rollout(jax.random.PRNGKey(4), carry)
    ended = np.asarray(transitions.done) > 0
    assert ended.sum() > 10
    np.testing.assert_allclose(np.asarray(transitions.episode_return)[ended],
                               np.asarray(transitions.episode_length)[ended])
    assert 8 < np.asarray(transitions.episode_return)[ended].mean() < 60  # random policy ~22
    np.testing.assert_allclose(transitions.value, 0.0)
    np.testing.assert_allclose(last_value, 0.0)
    np.testing.assert_allclose(transitions.logp, np.log(0.5), rtol=1e-6)


def _tracker_step(tracker, inputs):
    tracker, episode_return, episode_length = track_episodes(tracker, *inputs)
    return tracker, (episode_return, episode_length)


@jax.jit
def scan_tracker(rewards, dones):
    """Track [T, E] rewards and dones from a fresh tracker, compiled once for the module."""
    return jax.lax.scan(_tracker_step, init_episode_tracker(rewards.shape[1]), (rewards, dones))[1]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), done_rate=st.floats(0.0, 0.6))
def test_tracking_and_complete_mask_match_loops(seed, done_rate):
    """Random rewards and episode ends, [E=3, T=9]: the tracker scanned over time and the
    complete-episode mask against plain loops."""
    generator = np.random.default_rng(seed)
    rewards = generator.normal(size=(9, 3)).astype(np.float32)
    dones = generator.random((9, 3)) < done_rate
    got_returns, got_lengths = scan_tracker(jnp.asarray(rewards), jnp.asarray(dones))
    want_returns, want_lengths = np.zeros((9, 3)), np.zeros((9, 3))
    for env in range(3):
        running, length = 0.0, 0
        for t in range(9):
            running, length = running + rewards[t, env], length + 1
            if dones[t, env]:
                want_returns[t, env], want_lengths[t, env] = running, length
                running, length = 0.0, 0
    np.testing.assert_allclose(got_returns, want_returns, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_lengths, want_lengths)
    want_mask = np.array([[float(dones[t:, env].any()) for t in range(9)] for env in range(3)])
    np.testing.assert_array_equal(complete_episode_mask(jnp.asarray(dones.T, jnp.float32)),
                                  want_mask)
