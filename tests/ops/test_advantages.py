import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops.advantages import discounted_returns, gae, group_advantages, rloo_advantages

METHODS = ("scan", "associative")


# ---------------------------------------------------------------- NumPy oracles (float64 loops)


def gae_oracle(rewards, values, mask, gamma, gae_lambda, dones=None, bootstrap_value=None):
    rewards = np.asarray(rewards, np.float64)
    values = np.asarray(values, np.float64)
    batch, time = rewards.shape
    mask = np.ones((batch, time)) if mask is None else np.asarray(mask, np.float64)
    dones = np.zeros((batch, time)) if dones is None else np.asarray(dones, np.float64)
    bootstrap_value = np.zeros(batch) if bootstrap_value is None else np.asarray(bootstrap_value, np.float64)
    rewards, values = rewards * mask, values * mask
    advantages = np.zeros((batch, time))
    for b in range(batch):
        next_advantage, next_value = 0.0, bootstrap_value[b]
        for t in reversed(range(time)):
            not_done = 1.0 - dones[b, t]
            delta = rewards[b, t] + gamma * next_value * not_done - values[b, t]
            next_advantage = delta + gamma * gae_lambda * not_done * next_advantage
            advantages[b, t] = next_advantage
            next_value = values[b, t]
    return advantages * mask, (advantages + values) * mask


def returns_oracle(rewards, mask, gamma, dones=None, bootstrap_value=None):
    rewards = np.asarray(rewards, np.float64)
    batch, time = rewards.shape
    mask = np.ones((batch, time)) if mask is None else np.asarray(mask, np.float64)
    dones = np.zeros((batch, time)) if dones is None else np.asarray(dones, np.float64)
    bootstrap_value = np.zeros(batch) if bootstrap_value is None else np.asarray(bootstrap_value, np.float64)
    out = np.zeros((batch, time))
    for b in range(batch):
        running = bootstrap_value[b]
        for t in reversed(range(time)):
            running = rewards[b, t] * mask[b, t] + gamma * (1.0 - dones[b, t]) * running
            out[b, t] = running
    return out * mask


# ---------------------------------------------------------------- data


def right_padded_mask(rng, batch, time, min_len=0):
    lengths = rng.integers(min_len, time + 1, size=batch)
    lengths[0] = time  # one full row (value after it is the bootstrap)
    if batch > 2:
        lengths[1] = 0  # one empty row
    return (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)


def lm_batch(seed, batch=5, time=9):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, time)).astype(np.float32) * 0.37
    values = rng.normal(size=(batch, time)).astype(np.float32)
    mask = right_padded_mask(rng, batch, time)
    # Garbage in padding: the mask must make it irrelevant.
    rewards = np.where(mask > 0, rewards, 7.5).astype(np.float32)
    values = np.where(mask > 0, values, -3.25).astype(np.float32)
    return rewards, values, mask


def env_batch(seed, batch=4, time=11, done_rate=0.2):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    dones = rng.random((batch, time)) < done_rate
    bootstrap_value = rng.normal(size=batch).astype(np.float32)
    return rewards, values, dones, bootstrap_value


jit_gae = jax.jit(gae, static_argnames=("method",))
jit_returns = jax.jit(discounted_returns, static_argnames=("method",))


# ---------------------------------------------------------------- GAE


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("gamma,gae_lambda", [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (0.8, 1.0)])
def test_gae_lm_matches_oracle(method, gamma, gae_lambda):
    rewards, values, mask = lm_batch(seed=int(gamma * 100 + gae_lambda * 10))
    want_adv, want_ret = gae_oracle(rewards, values, mask, gamma, gae_lambda)
    for fn in (gae, jit_gae):
        adv, ret = fn(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, method=method)
        assert adv.dtype == jnp.float32 and adv.shape == rewards.shape
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_value_after_last_response_token_is_zero():
    rewards, values, mask = lm_batch(seed=3)
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=0.95)
    lengths = mask.sum(axis=1).astype(int)
    for b, length in enumerate(lengths):
        if length == 0:
            assert np.all(np.asarray(adv[b]) == 0.0) and np.all(np.asarray(ret[b]) == 0.0)
            continue
        last = length - 1
        np.testing.assert_allclose(adv[b, last], rewards[b, last] - values[b, last], rtol=1e-6)
        np.testing.assert_allclose(ret[b, last], rewards[b, last], rtol=1e-6)
        assert np.all(np.asarray(adv[b, length:]) == 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_gae_and_returns_ignore_nan_in_padding(method):
    rewards, values, mask = lm_batch(seed=4)
    nan_rewards = np.where(mask > 0, rewards, np.nan).astype(np.float32)
    nan_values = np.where(mask > 0, values, np.inf).astype(np.float32)
    adv, ret = jit_gae(nan_rewards, nan_values, mask, gamma=1.0, gae_lambda=0.95, method=method)
    want_adv, want_ret = gae_oracle(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    got = jit_returns(nan_rewards, mask, gamma=0.9, method=method)
    np.testing.assert_allclose(got, returns_oracle(rewards, mask, 0.9), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_gae_environment_dones_and_bootstrap_match_oracle(method):
    for seed, (gamma, gae_lambda) in enumerate([(0.99, 0.95), (0.9, 0.5), (1.0, 1.0)]):
        rewards, values, dones, bootstrap_value = env_batch(seed)
        want_adv, want_ret = gae_oracle(rewards, values, None, gamma, gae_lambda, dones, bootstrap_value)
        adv, ret = jit_gae(
            rewards, values, gamma=gamma, gae_lambda=gae_lambda, dones=dones, bootstrap_value=bootstrap_value, method=method
        )
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
        # float dones behave as bool dones
        adv_float, _ = jit_gae(
            rewards, values, gamma=gamma, gae_lambda=gae_lambda, dones=dones.astype(np.float32),
            bootstrap_value=bootstrap_value, method=method,
        )
        np.testing.assert_allclose(adv_float, adv, rtol=1e-6, atol=1e-6)


def test_gae_done_cuts_the_bootstrap():
    rewards = np.array([[1.0, 2.0, 3.0]], np.float32)
    values = np.zeros((1, 3), np.float32)
    dones = np.array([[False, False, True]])
    adv, _ = gae(rewards, values, gamma=0.5, gae_lambda=1.0, dones=dones, bootstrap_value=np.array([100.0], np.float32))
    np.testing.assert_allclose(adv, [[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]], rtol=1e-6)
    adv, _ = gae(rewards, values, gamma=0.5, gae_lambda=1.0, bootstrap_value=np.array([100.0], np.float32))
    np.testing.assert_allclose(adv[0, 2], 3.0 + 50.0, rtol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_gae_gamma_lam_one_is_reward_to_go_minus_value(method):
    rewards, values, mask = lm_batch(seed=11)
    masked_rewards, masked_values = rewards * mask, values * mask
    reward_to_go = np.cumsum(masked_rewards[:, ::-1], axis=1)[:, ::-1]
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0, method=method)
    np.testing.assert_allclose(adv, (reward_to_go - masked_values) * mask, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, reward_to_go * mask, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (3, 5), (4, 16), (2, 33)]),
    gamma=st.floats(0.0, 1.0),
    gae_lambda=st.floats(0.0, 1.0),
    use_mask=st.booleans(),
    done_rate=st.sampled_from([0.0, 0.1, 0.5]),
    use_bootstrap=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gae_associative_agrees_with_scan(shape, gamma, gae_lambda, use_mask, done_rate, use_bootstrap, seed):
    batch, time = shape
    rng = np.random.default_rng(seed)
    rewards, values, dones, bootstrap_value = env_batch(seed, batch, time, done_rate)
    # Always pass arrays (all-ones mask, zero bootstrap) so each shape compiles once.
    mask = right_padded_mask(rng, batch, time) if use_mask else np.ones((batch, time), np.float32)
    bootstrap_value = bootstrap_value if use_bootstrap else np.zeros(batch, np.float32)
    kwargs = dict(gamma=gamma, gae_lambda=gae_lambda, dones=dones, bootstrap_value=bootstrap_value)
    adv_scan, ret_scan = jit_gae(rewards, values, mask, method="scan", **kwargs)
    adv_assoc, ret_assoc = jit_gae(rewards, values, mask, method="associative", **kwargs)
    np.testing.assert_allclose(adv_assoc, adv_scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret_assoc, ret_scan, rtol=1e-5, atol=1e-5)
    want_adv, _ = gae_oracle(rewards, values, mask, gamma, gae_lambda, dones, bootstrap_value)
    np.testing.assert_allclose(adv_scan, want_adv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_gae_traced_gamma_lam_vmap_and_grad(method):
    rewards, values, mask = lm_batch(seed=5)

    @functools.partial(jax.jit, static_argnames="method")
    def run(rewards, values, mask, gamma, gae_lambda, method):
        return gae(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, method=method)

    adv, _ = run(rewards, values, mask, jnp.float32(0.9), jnp.float32(0.7), method)
    np.testing.assert_allclose(adv, gae_oracle(rewards, values, mask, 0.9, 0.7)[0], rtol=1e-5, atol=1e-5)

    # A single trajectory [T] works, so vmap over the batch reproduces the batched call.
    per_row = jax.jit(jax.vmap(lambda r, v, m: gae(r, v, m, gamma=0.9, gae_lambda=0.7, method=method)))(rewards, values, mask)
    np.testing.assert_allclose(per_row[0], adv, rtol=1e-6, atol=1e-6)

    # dA/dr >= 0, dA_t/dV_t = -1 at gamma = gae_lambda = 1, all finite; grad w.r.t. a traced gamma too.
    grad_rewards = jax.jit(jax.grad(lambda r: gae(r, values, mask, gamma=0.9, gae_lambda=0.7, method=method)[0].sum()))(rewards)
    assert np.all(np.isfinite(grad_rewards)) and np.all(np.asarray(grad_rewards) >= 0.0)
    assert np.all(np.asarray(grad_rewards)[mask == 0] == 0.0)
    grad_values = jax.jit(jax.grad(lambda v: gae(rewards, v, mask, gamma=1.0, gae_lambda=1.0, method=method)[0].sum()))(values)
    np.testing.assert_allclose(grad_values, -mask, atol=1e-6)
    grad_gamma = jax.jit(jax.grad(lambda g: gae(rewards, values, mask, gamma=g, gae_lambda=0.7, method=method)[0].sum()))(0.9)
    assert np.isfinite(grad_gamma)


def test_gae_bfloat16_inputs_compute_in_float32():
    rewards, values, mask = lm_batch(seed=8)
    adv, ret = gae(rewards.astype(jnp.bfloat16), values.astype(jnp.bfloat16), mask, gamma=1.0, gae_lambda=0.95)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32


def test_gae_rejects_bad_inputs():
    rewards, values, mask = lm_batch(seed=1)
    with pytest.raises(ValueError, match="`values` has shape"):
        gae(rewards, values[:, :-1], gamma=1.0, gae_lambda=0.95)
    with pytest.raises(ValueError, match="`mask` has shape"):
        gae(rewards, values, mask[:, :-1], gamma=1.0, gae_lambda=0.95)
    with pytest.raises(ValueError, match="`dones` has shape"):
        gae(rewards, values, gamma=1.0, gae_lambda=0.95, dones=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="`bootstrap_value` must have shape"):
        gae(rewards, values, gamma=1.0, gae_lambda=0.95, bootstrap_value=np.zeros((5, 1), np.float32))
    with pytest.raises(ValueError, match="`method` must be one of"):
        gae(rewards, values, gamma=1.0, gae_lambda=0.95, method="loop")
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\]"):
        gae(rewards, values, gamma=1.5, gae_lambda=0.95)
    with pytest.raises(ValueError, match="`gae_lambda` must be a scalar"):
        gae(rewards, values, gamma=1.0, gae_lambda=np.full(5, 0.9))
    with pytest.raises(ValueError, match="`rewards` must be a floating-point"):
        gae(rewards.astype(np.int32), values, gamma=1.0, gae_lambda=0.95)
    with pytest.raises(ValueError, match="time axis"):
        gae(np.float32(1.0), np.float32(1.0), gamma=1.0, gae_lambda=0.95)
    with pytest.raises(ValueError, match="`values` is required by `gae`.*use `discounted_returns"):
        gae(rewards, None, mask, gamma=1.0, gae_lambda=0.95)


# ---------------------------------------------------------------- discounted returns


@pytest.mark.parametrize("method", METHODS)
def test_discounted_returns_match_oracle(method):
    rewards, _, mask = lm_batch(seed=21)
    for gamma in (1.0, 0.9, 0.0):
        want = returns_oracle(rewards, mask, gamma)
        for fn in (discounted_returns, jit_returns):
            got = fn(rewards, mask, gamma=gamma, method=method)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rewards, _, dones, bootstrap_value = env_batch(seed=22)
    want = returns_oracle(rewards, None, 0.97, dones, bootstrap_value)
    got = jit_returns(rewards, gamma=0.97, dones=dones, bootstrap_value=bootstrap_value, method=method)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_discounted_returns_equal_gae_returns_with_zero_values_and_lam_one():
    rewards, _, dones, bootstrap_value = env_batch(seed=23)
    zeros = np.zeros_like(rewards)
    _, gae_returns = gae(rewards, zeros, gamma=0.9, gae_lambda=1.0, dones=dones, bootstrap_value=bootstrap_value)
    got = discounted_returns(rewards, gamma=0.9, dones=dones, bootstrap_value=bootstrap_value)
    np.testing.assert_allclose(got, gae_returns, rtol=1e-5, atol=1e-5)


def test_discounted_returns_rejects_bad_inputs():
    rewards, _, mask = lm_batch(seed=1)
    with pytest.raises(ValueError, match="`mask` has shape"):
        discounted_returns(rewards, mask[:1], gamma=0.9)
    with pytest.raises(ValueError, match=r"`gamma` must be in \[0, 1\]"):
        discounted_returns(rewards, gamma=-0.1)


# ---------------------------------------------------------------- group baselines


def group_oracle(rewards, group_size, scale, eps):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    batch_std = rewards.std(ddof=1)
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        centered = group - group.mean()
        if scale == "group":
            centered = centered / (group.std(ddof=1) + eps)
        elif scale == "batch":
            centered = centered / (batch_std + eps)
        out[start:start + group_size] = centered
    return out


def rloo_oracle(rewards, group_size):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for i in range(len(rewards)):
        start = (i // group_size) * group_size
        others = [rewards[j] for j in range(start, start + group_size) if j != i]
        out[i] = rewards[i] - np.mean(others)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [2, 4])
def test_group_advantages_match_oracle(scale, group_size):
    rng = np.random.default_rng(group_size)
    rewards = (rng.normal(size=3 * group_size) * 1.7 + 0.3).astype(np.float32)
    rewards[:group_size] = 0.25  # a group with identical rewards -> advantages exactly 0
    jitted = jax.jit(group_advantages, static_argnames=("group_size", "scale"))
    for eps in (1e-4, 0.5):
        want = group_oracle(rewards, group_size, scale, eps)
        for fn in (group_advantages, jitted):
            got = fn(rewards, group_size, scale=scale, eps=eps)
            assert got.shape == rewards.shape and got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(got[:group_size]) == 0.0)


@pytest.mark.parametrize("group_size", [2, 3, 5])
def test_rloo_advantages_match_oracle(group_size):
    rng = np.random.default_rng(group_size)
    rewards = rng.normal(size=4 * group_size).astype(np.float32)
    want = rloo_oracle(rewards, group_size)
    np.testing.assert_allclose(rloo_advantages(rewards, group_size), want, rtol=1e-5, atol=1e-5)
    jitted = jax.jit(rloo_advantages, static_argnames="group_size")
    np.testing.assert_allclose(jitted(rewards, group_size), want, rtol=1e-5, atol=1e-5)


def test_group_baselines_grad_sign():
    rewards = jnp.array([1.0, 2.0, 0.5, -1.0], jnp.float32)
    for fn in (lambda r: group_advantages(r, 2), lambda r: rloo_advantages(r, 2)):
        grad = jax.jit(jax.grad(lambda r: fn(r)[0]))(rewards)  # raising R_0 raises A_0, lowers A_0 via R_1
        assert grad[0] > 0 and grad[1] < 0 and grad[2] == 0 and grad[3] == 0


def test_group_baselines_reject_bad_inputs():
    rewards = np.arange(6, dtype=np.float32)
    for fn in (group_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="not a multiple of `group_size`"):
            fn(rewards, 4)
        with pytest.raises(ValueError, match="`group_size` must be an int >= 2"):
            fn(rewards, 1)
        with pytest.raises(ValueError, match="`rewards` must have rank 1"):
            fn(rewards.reshape(2, 3), 3)
    with pytest.raises(ValueError, match="`scale` must be one of"):
        group_advantages(rewards, 3, scale="global")
