"""REINFORCE with and without a value baseline, through the whole jitted run."""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.classic.config import ClassicConfig, derived_sizes
from rlhf_jax.classic.train import make_train


def window_return(metrics, updates):
    sums = np.asarray(metrics["episode/return_sum"])[..., updates].sum(-1)
    counts = np.asarray(metrics["episode/count"])[..., updates].sum(-1)
    return sums / np.maximum(counts, 1)


def test_reinforce_with_baseline_improves_on_cartpole():
    config = ClassicConfig(algorithm="reinforce", baseline=True, num_envs=16, num_steps=128,
                           total_timesteps=16 * 128 * 24, epochs=1, num_minibatches=1,
                           learning_rate=3e-3, anneal_lr=False, ent_coef=0.0, vf_coef=0.5)
    rngs = jax.vmap(jax.random.PRNGKey)(jnp.arange(2))
    runner, metrics = jax.jit(jax.vmap(make_train(config)))(rngs)
    start = window_return(metrics, slice(0, 2))
    end = window_return(metrics, slice(-4, None))
    assert np.all(end > 2 * start), (start, end)
    assert np.all(np.isfinite(metrics["loss/value"])) and np.all(metrics["loss/value"] > 0)
    counted = metrics["reinforce/counted_fraction"]
    assert np.all((counted > 0) & (counted <= 1))
    assert np.all(runner.critic_state.step == derived_sizes(config).num_updates)


def test_reinforce_without_baseline_runs_without_a_critic():
    # (Acrobot without a baseline runs in test_classic_run.py.)
    config = ClassicConfig(algorithm="reinforce", baseline=False, num_envs=4,
                           num_steps=64, total_timesteps=4 * 64 * 2, epochs=1,
                           num_minibatches=1)
    runner, metrics = jax.jit(make_train(config))(jax.random.PRNGKey(0))
    assert runner.critic_state is None
    assert metrics["loss/policy"].shape == (derived_sizes(config).num_updates,)
    assert np.all(np.isfinite(metrics["loss/policy"]))
    np.testing.assert_array_equal(metrics["loss/value"], 0.0)
    assert int(runner.actor_state.step) == 2
