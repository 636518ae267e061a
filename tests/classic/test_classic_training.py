"""Whole-run PPO training as one jitted function: learning, and the vmap-over-seeds path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.classic.config import ClassicConfig, derived_sizes
from rlhf_jax.classic.train import make_train

RANDOM_CARTPOLE_RETURN = 22.0  # mean episode return of the uniform policy
CONFIG = ClassicConfig(num_envs=8, num_steps=32, total_timesteps=8 * 32 * 48, epochs=10,
                       num_minibatches=1, gamma=0.98, gae_lambda=0.8, ent_coef=0.0, learning_rate=1e-3)


def window_return(metrics, updates):
    sums = np.asarray(metrics["episode/return_sum"])[..., updates].sum(-1)
    counts = np.asarray(metrics["episode/count"])[..., updates].sum(-1)
    return sums / np.maximum(counts, 1)


@pytest.fixture(scope="module")
def two_seed_run():
    rngs = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    runner, metrics = jax.jit(jax.vmap(make_train(CONFIG)))(rngs)
    return rngs, runner, metrics


def test_ppo_short_run_beats_random_policy_for_each_seed(two_seed_run):
    _, runner, metrics = two_seed_run
    sizes = derived_sizes(CONFIG)
    assert metrics["episode/count"].shape == (2, sizes.num_updates)
    np.testing.assert_array_equal(metrics["env_steps"][0],
                                  (np.arange(sizes.num_updates) + 1) * sizes.batch_size)
    for key in ("loss/total", "loss/policy", "loss/value", "loss/entropy", "ppo/clipfrac",
                "ppo/approx_kl", "value/explained_variance"):
        assert np.all(np.isfinite(metrics[key])), key
    start = window_return(metrics, slice(0, 2))
    end = window_return(metrics, slice(-6, None))
    assert np.all(start < 2 * RANDOM_CARTPOLE_RETURN), start
    assert np.all(end > 4 * RANDOM_CARTPOLE_RETURN), end
    # Each seed has its own parameters, and both optimizers stepped once per minibatch.
    kernels = runner.actor_state.params["params"]["Dense_0"]["kernel"]
    assert kernels.shape[0] == 2 and not np.allclose(kernels[0], kernels[1])
    assert np.all(runner.critic_state.step == sizes.optimizer_steps)
    assert np.all(runner.update_count == sizes.num_updates)


def test_vmap_over_seeds_matches_single_seed_runs_and_is_deterministic(two_seed_run):
    rngs, _, batched = two_seed_run
    single = jax.jit(make_train(CONFIG))
    _, alone = single(rngs[1])
    # The first updates agree to float tolerance (later ones may drift apart: a tiny
    # difference can flip a sampled action).
    for key in ("episode/return_sum", "episode/count", "loss/policy", "loss/value"):
        np.testing.assert_allclose(batched[key][1][:3], alone[key][:3], rtol=2e-4, atol=1e-5,
                                   err_msg=key)
    assert not np.allclose(batched["loss/value"][0], batched["loss/value"][1])
    # Deterministic in the key.
    _, again = single(rngs[1])
    for key in alone:
        np.testing.assert_array_equal(alone[key], again[key], err_msg=key)
    # A hyperparameter that is not a size changes no shape (so nothing recompiles per size).
    other = jax.eval_shape(make_train(dataclasses.replace(CONFIG, learning_rate=1e-4, clip_eps=0.1)),
                           rngs[0])
    assert jax.tree.map(lambda x: x.shape, other[1]) == jax.tree.map(lambda x: x.shape, alone)
