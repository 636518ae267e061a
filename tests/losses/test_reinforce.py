import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.reinforce import reinforce_loss

B, T = 6, 7


def right_padded_mask(rng, min_len=1):
    lengths = rng.integers(min_len, T + 1, size=B)
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)


def make_batch(seed):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 4.0, size=(B, T)).astype(np.float32)
    token_returns = rng.normal(loc=0.3, size=(B, T)).astype(np.float32)
    sequence_returns = rng.normal(loc=0.3, size=(B,)).astype(np.float32)
    return logp, token_returns, sequence_returns, right_padded_mask(rng), rng


def np_reinforce(logp, returns, mask, baseline=None, normalize=False, mode="token_mean"):
    returns = np.broadcast_to(returns[:, None] if returns.ndim == 1 else returns, logp.shape)
    advantages = returns.astype(np.float64).copy()
    if baseline is not None:
        advantages = advantages - np.broadcast_to(baseline[:, None] if baseline.ndim == 1 else baseline, logp.shape)
    counted = mask > 0
    if normalize:
        values = advantages[counted]
        std = np.std(values, ddof=1)
        advantages = (advantages - values.mean()) / np.sqrt(std**2 + 1e-8)
    per_token = -logp * advantages
    if mode == "token_mean":
        loss = per_token[counted].sum() / counted.sum()
    elif mode == "sequence_sum":
        loss = np.mean([per_token[b][counted[b]].sum() for b in range(B)])
    elif mode == "sequence_mean":
        loss = np.mean([per_token[b][counted[b]].mean() for b in range(B)])
    else:
        raise AssertionError(mode)
    metrics = {
        "reinforce/return_mean": returns[counted].mean(),
        "reinforce/advantage_mean": advantages[counted].mean(),
        "reinforce/advantage_std": np.std(advantages[counted], ddof=1),
    }
    return loss, metrics


@pytest.mark.parametrize("returns_kind", ["token", "sequence"])
@pytest.mark.parametrize("baseline_kind", [None, "token", "sequence"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", ["token_mean", "sequence_sum", "sequence_mean"])
def test_matches_oracle(returns_kind, baseline_kind, normalize, mode):
    logp, token_returns, sequence_returns, mask, rng = make_batch(0)
    returns = token_returns if returns_kind == "token" else sequence_returns
    baseline = None
    if baseline_kind == "token":
        baseline = rng.normal(size=(B, T)).astype(np.float32)
    elif baseline_kind == "sequence":
        baseline = rng.normal(size=(B,)).astype(np.float32)
    loss, metrics = reinforce_loss(
        jnp.asarray(logp), jnp.asarray(returns), jnp.asarray(mask),
        baseline=None if baseline is None else jnp.asarray(baseline), normalize=normalize, aggregation=mode,
    )
    expected, expected_metrics = np_reinforce(logp, returns, mask, baseline, normalize, mode)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(metrics["reinforce/loss"], expected, rtol=1e-4, atol=1e-5)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_sequence_sum_is_classic_sequence_reinforce():
    logp, _, sequence_returns, mask, _ = make_batch(1)
    loss, _ = reinforce_loss(jnp.asarray(logp), jnp.asarray(sequence_returns), jnp.asarray(mask), aggregation="sequence_sum")
    expected = -np.mean(sequence_returns * (logp * mask).sum(1))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_gradient_is_score_function_and_stops_at_returns():
    logp, token_returns, _, mask, rng = make_batch(2)
    baseline = rng.normal(size=(B,)).astype(np.float32)
    fn = jax.jit(jax.grad(lambda lp, g, b: reinforce_loss(lp, g, jnp.asarray(mask), baseline=b)[0], argnums=(0, 1, 2)))
    grad_logp, grad_returns, grad_baseline = fn(*map(jnp.asarray, (logp, token_returns, baseline)))
    advantages = token_returns - baseline[:, None]
    np.testing.assert_allclose(grad_logp, -advantages * mask / mask.sum(), rtol=1e-5, atol=1e-7)
    assert np.all(grad_returns == 0) and np.all(grad_baseline == 0)
    # Positive advantage -> raising logp lowers the loss.
    positive = (advantages > 0) & (mask > 0)
    assert positive.any() and np.all(np.asarray(grad_logp)[positive] < 0)


def test_padding_garbage_ignored_and_jit_matches():
    logp, token_returns, _, mask, _ = make_batch(3)
    dirty_returns = np.where(mask > 0, token_returns, np.nan).astype(np.float32)
    fn = functools.partial(reinforce_loss, normalize=True, aggregation="grpo")
    clean, _ = fn(jnp.asarray(logp), jnp.asarray(token_returns), jnp.asarray(mask))
    dirty, metrics = fn(jnp.asarray(logp), jnp.asarray(dirty_returns), jnp.asarray(mask))
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    assert all(np.isfinite(float(v)) for v in metrics.values())
    jitted, _ = jax.jit(fn)(jnp.asarray(logp), jnp.asarray(token_returns), jnp.asarray(mask))
    np.testing.assert_allclose(jitted, clean, rtol=1e-6)


@hypothesis.settings(max_examples=20, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), shift=st.floats(-10, 10))
def test_normalized_loss_is_invariant_to_return_shift(seed, shift):
    logp, token_returns, _, mask, _ = make_batch(seed)
    args = (jnp.asarray(logp), jnp.asarray(token_returns), jnp.asarray(mask))
    base, _ = reinforce_loss(*args, normalize=True)
    shifted, _ = reinforce_loss(args[0], args[1] + shift, args[2], normalize=True)
    np.testing.assert_allclose(shifted, base, rtol=1e-3, atol=1e-4)


def test_bad_inputs_raise():
    logp, token_returns, sequence_returns, mask, _ = map(
        lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, make_batch(4)
    )
    with pytest.raises(ValueError, match="returns"):
        reinforce_loss(logp, token_returns[:, :-1], mask)
    with pytest.raises(ValueError, match="returns"):
        reinforce_loss(logp, sequence_returns[:-1], mask)
    with pytest.raises(ValueError, match="baseline"):
        reinforce_loss(logp, token_returns, mask, baseline=jnp.ones((T,)))
    with pytest.raises(ValueError, match="mask"):
        reinforce_loss(logp, token_returns, mask[:-1])
    with pytest.raises(ValueError, match="logp"):
        reinforce_loss(logp[0], token_returns[0], mask[0])
    with pytest.raises(ValueError, match="aggregation"):
        reinforce_loss(logp, token_returns, mask, aggregation="sum")
