"""`make_train_step`: one jitted step that reports its compile-cache size to the training loop."""
import jax.numpy as jnp
import numpy as np

from rlhf_jax.training.step_runner import JittedStep, make_train_step


def scaled_step(state, batch, ref_params=None, *, scale):
    shift = 0.0 if ref_params is None else ref_params
    new_state = state + scale * batch.sum() + shift
    return new_state, {"sum": batch.sum()}


def test_cache_size_counts_both_jitted_functions():
    run = make_train_step(scaled_step, scale=2.0, donate=False)
    assert isinstance(run, JittedStep) and run._cache_size() == 0
    state, metrics = run(jnp.zeros(()), jnp.ones((3,)))
    np.testing.assert_allclose(state, 6.0)
    np.testing.assert_allclose(metrics["sum"], 3.0)
    state, _ = run(state, jnp.ones((3,)))
    assert run._cache_size() == 1  # same shapes: no new compile
    state, _ = run(state, jnp.ones((3,)), jnp.ones(()))
    np.testing.assert_allclose(state, 6.0 + 6.0 + 6.0 + 1.0)
    assert run._cache_size() == 2  # the reference-taking function compiled once
    run(state, jnp.ones((4,)))
    assert run._cache_size() == 3  # a new batch shape compiles again, which run_loop reports
