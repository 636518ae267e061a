import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.value import value_loss

B, T = 5, 7


def right_padded_mask(rng, min_len=1):
    lengths = rng.integers(min_len, T + 1, size=B)
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)


def make_batch(seed):
    rng = np.random.default_rng(seed)
    old_values = rng.normal(size=(B, T)).astype(np.float32)
    values = (old_values + rng.normal(scale=0.5, size=(B, T))).astype(np.float32)
    returns = (old_values + rng.normal(scale=1.0, size=(B, T))).astype(np.float32)
    return values, old_values, returns, right_padded_mask(rng)


def np_value_loss(values, old_values, returns, mask, clip_eps, mode="token_mean"):
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token, clipped = 0.5 * unclipped, unclipped
    else:
        clipped_values = np.minimum(np.maximum(values, old_values - clip_eps), old_values + clip_eps)
        clipped = (clipped_values - returns) ** 2
        per_token = 0.5 * np.maximum(unclipped, clipped)
    if mode == "token_mean":
        loss = (per_token * mask).sum() / mask.sum()
    elif mode == "sequence_mean":
        loss = np.mean((per_token * mask).sum(1) / mask.sum(1))
    else:
        raise AssertionError(mode)
    counted = mask > 0
    residual = (returns - values)[counted]
    metrics = {
        "value/clipfrac": np.mean((clipped > unclipped)[counted]),
        "value/mean": np.mean(values[counted]),
        "value/explained_variance": 1 - np.var(residual) / np.var(returns[counted]),
    }
    return loss, metrics


@pytest.mark.parametrize("clip_eps", [None, 0.1, 0.2, 1.0])
@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle(clip_eps, mode, seed):
    values, old_values, returns, mask = make_batch(seed)
    loss, metrics = value_loss(*map(jnp.asarray, (values, old_values, returns, mask)), value_clip_eps=clip_eps, aggregation=mode)
    expected, expected_metrics = np_value_loss(values, old_values, returns, mask, clip_eps, mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["value/loss"], expected, rtol=1e-5)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    if clip_eps == 0.1:
        assert 0 < float(metrics["value/clipfrac"]) < 1


def test_unclipped_without_old_values():
    values, old_values, returns, mask = map(jnp.asarray, make_batch(2))
    with_old, _ = value_loss(values, old_values, returns, mask)
    without_old, metrics = value_loss(values, None, returns, mask)
    np.testing.assert_allclose(without_old, with_old)
    assert float(metrics["value/clipfrac"]) == 0.0
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, None, returns, mask, value_clip_eps=0.2)


def test_gradient_signs_and_clipping():
    #                    V>R,  V<R, clipped-away, padding
    values = jnp.array([[1.0, -1.0, 2.0, 5.0]])
    old_values = jnp.array([[1.0, -1.0, 0.0, 0.0]])
    returns = jnp.array([[0.0, 0.0, 3.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    grad = jax.jit(jax.grad(lambda v: value_loss(v, old_values, returns, mask, value_clip_eps=0.5)[0]))(values)
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and grad[0, 3] == 0
    # V=2 is outside [V_old - 0.5, V_old + 0.5]; the clipped error (0.5 - 3)^2 > (2 - 3)^2 wins
    # and does not depend on V, so no gradient flows.
    assert grad[0, 2] == 0
    grad = jax.jit(jax.grad(lambda v: value_loss(v, old_values, returns, mask)[0]))(values)
    np.testing.assert_allclose(grad, np.array([[1.0, -1.0, -1.0, 0.0]]) / 3, rtol=1e-6)


def test_gradient_only_reaches_values_and_jit_matches():
    values, old_values, returns, mask = map(jnp.asarray, make_batch(3))
    fn = functools.partial(value_loss, value_clip_eps=0.2)
    grads = jax.jit(jax.grad(lambda v, o, r: fn(v, o, r, mask)[0], argnums=(0, 1, 2)))(values, old_values, returns)
    assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).sum() > 0
    assert np.all(grads[1] == 0) and np.all(grads[2] == 0)
    eager_loss, eager_metrics = fn(values, old_values, returns, mask)
    jit_loss, jit_metrics = jax.jit(fn)(values, old_values, returns, mask)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6, atol=1e-7)


def test_explained_variance_edge_cases():
    values, old_values, returns, mask = map(jnp.asarray, make_batch(4))
    _, metrics = value_loss(returns, old_values, returns, mask)
    np.testing.assert_allclose(metrics["value/explained_variance"], 1.0, rtol=1e-6)
    constant_returns = jnp.ones_like(returns)
    _, metrics = value_loss(values, old_values, constant_returns, mask)
    assert float(metrics["value/explained_variance"]) == 0.0


def test_padding_garbage_ignored():
    values, old_values, returns, mask = make_batch(5)
    dirty_returns = np.where(mask > 0, returns, np.nan).astype(np.float32)
    clean, _ = value_loss(*map(jnp.asarray, (values, old_values, returns, mask)), value_clip_eps=0.2)
    dirty, metrics = value_loss(*map(jnp.asarray, (values, old_values, dirty_returns, mask)), value_clip_eps=0.2)
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_bad_inputs_raise():
    values, old_values, returns, mask = map(jnp.asarray, make_batch(6))
    with pytest.raises(ValueError, match="returns"):
        value_loss(values, old_values, returns[:, :-1], mask)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(values, old_values[:-1], returns, mask)
    with pytest.raises(ValueError, match="values"):
        value_loss(values[0], old_values[0], returns[0], mask[0])
    with pytest.raises(ValueError, match="aggregation"):
        value_loss(values, old_values, returns, mask, aggregation="median")
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(values, old_values, returns, mask, value_clip_eps=0.0)
