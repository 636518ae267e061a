import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.regression import awr_weights, rwr_weights, weighted_nll_loss

B, T = 8, 6


def np_rwr(rewards, beta, top_k):
    rewards = rewards.astype(np.float64)
    z = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-8)
    raw = np.exp(beta * z)
    order = sorted(range(len(rewards)), key=lambda i: (-rewards[i], i))
    kept = np.zeros(len(rewards), bool)
    kept[order[: (top_k or len(rewards))]] = True
    return np.where(kept, raw / raw[kept].mean(), 0.0)


def np_awr(advantages, beta, max_weight, normalize):
    weights = np.exp(advantages.astype(np.float64) / beta)
    if max_weight is not None:
        weights = np.minimum(weights, max_weight)
    return weights / weights.mean() if normalize else weights


def right_padded_mask(rng, min_len=1):
    lengths = rng.integers(min_len, T + 1, size=B)
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("top_k", [None, 1, 3, B])
def test_rwr_matches_oracle(beta, top_k):
    rewards = np.random.default_rng(0).normal(loc=2.0, scale=1.5, size=B).astype(np.float32)
    weights = rwr_weights(jnp.asarray(rewards), beta=beta, top_k=top_k)
    expected = np_rwr(rewards, beta, top_k)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    kept = expected > 0
    np.testing.assert_allclose(np.asarray(weights)[kept].mean(), 1.0, rtol=1e-5)
    assert int((np.asarray(weights) > 0).sum()) == (top_k or B)


def test_rwr_ties_keep_exactly_k_and_large_beta_is_finite():
    weights = rwr_weights(jnp.array([1.0, 1.0, 1.0, 0.0]), top_k=2)
    np.testing.assert_allclose(weights, [1.0, 1.0, 0.0, 0.0], rtol=1e-6)
    rewards = jnp.asarray(np.random.default_rng(1).normal(size=B).astype(np.float32))
    weights = rwr_weights(rewards, beta=500.0)
    assert np.all(np.isfinite(weights))
    np.testing.assert_allclose(jnp.mean(weights), 1.0, rtol=1e-5)
    assert int(jnp.argmax(weights)) == int(jnp.argmax(rewards))


def test_rwr_single_row_and_constant_rewards():
    np.testing.assert_allclose(rwr_weights(jnp.array([3.0])), [1.0])
    np.testing.assert_allclose(rwr_weights(jnp.full((4,), 2.5), beta=2.0), np.ones(4), rtol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16), beta=st.floats(0.1, 5.0), scale=st.floats(0.1, 100.0))
def test_rwr_is_invariant_to_reward_affine_maps_and_monotone(seed, beta, scale):
    rewards = np.random.default_rng(seed).normal(size=B).astype(np.float32)
    base = np.asarray(rwr_weights(jnp.asarray(rewards), beta=beta))
    mapped = np.asarray(rwr_weights(jnp.asarray(rewards * scale + 7.0), beta=beta))
    np.testing.assert_allclose(mapped, base, rtol=2e-3, atol=1e-5)
    order = np.argsort(rewards)
    assert np.all(np.diff(base[order]) >= -1e-6)


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("max_weight", [None, 20.0, 2.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_awr_matches_oracle(beta, max_weight, normalize):
    advantages = np.random.default_rng(2).normal(scale=2.0, size=B).astype(np.float32)
    weights = awr_weights(jnp.asarray(advantages), beta=beta, max_weight=max_weight, normalize=normalize)
    expected = np_awr(advantages, beta, max_weight, normalize)
    np.testing.assert_allclose(weights, expected, rtol=1e-5)
    if max_weight == 2.0 and not normalize:
        assert np.isclose(np.asarray(weights).max(), 2.0)


def test_awr_huge_advantages_are_capped_without_nan():
    advantages = jnp.array([1e4, -1e4, 0.0, 50.0])
    weights = awr_weights(advantages, normalize=False)
    np.testing.assert_allclose(weights, [20.0, 0.0, 1.0, 20.0], rtol=1e-6, atol=1e-30)
    grad = jax.grad(lambda a: jnp.sum(awr_weights(a)))(advantages)
    assert np.all(np.isfinite(grad))


def np_weighted_nll(logp, mask, weights):
    nll = np.array([-logp[b][mask[b] > 0].mean() for b in range(len(weights))])
    return np.mean(weights * nll), nll


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_nll_matches_oracle(seed):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.05, 5.0, size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng)
    weights = np_rwr(rng.normal(size=B), 1.0, 5).astype(np.float32)
    loss, metrics = weighted_nll_loss(jnp.asarray(logp), jnp.asarray(mask), jnp.asarray(weights))
    expected, nll = np_weighted_nll(logp, mask, weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["regression/loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["regression/nll"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["regression/weight_max"], weights.max(), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["regression/effective_sample_size"], weights.sum() ** 2 / (weights**2).sum(), rtol=1e-5
    )


def test_weighted_nll_gradient():
    rng = np.random.default_rng(3)
    logp = jnp.asarray(-rng.uniform(0.05, 5.0, size=(B, T)).astype(np.float32))
    mask = right_padded_mask(rng)
    weights = jnp.asarray(np.linspace(0.0, 2.0, B).astype(np.float32))
    grads = jax.jit(jax.grad(lambda lp, w: weighted_nll_loss(lp, jnp.asarray(mask), w)[0], argnums=(0, 1)))(
        logp, weights
    )
    expected = -np.asarray(weights)[:, None] * mask / mask.sum(1, keepdims=True) / B
    np.testing.assert_allclose(grads[0], expected, rtol=1e-5, atol=1e-8)
    assert np.all(grads[1] == 0)
    # Weighted rows are pushed up (negative gradient), zero-weight rows untouched.
    assert np.all(np.asarray(grads[0])[1:][mask[1:] > 0] < 0) and np.all(grads[0][0] == 0)


def test_rwr_pipeline_under_jit():
    rng = np.random.default_rng(4)
    rewards = jnp.asarray(rng.normal(size=B).astype(np.float32))
    logp = jnp.asarray(-rng.uniform(0.05, 5.0, size=(B, T)).astype(np.float32))
    mask = jnp.asarray(right_padded_mask(rng))

    def pipeline(rewards, logp, mask):
        return weighted_nll_loss(logp, mask, rwr_weights(rewards, beta=2.0, top_k=4))[0]

    np.testing.assert_allclose(jax.jit(pipeline)(rewards, logp, mask), pipeline(rewards, logp, mask), rtol=1e-6)


def test_bad_inputs_raise():
    rewards = jnp.ones((B,))
    for top_k in (0, B + 1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            rwr_weights(rewards, top_k=top_k)
    with pytest.raises(ValueError, match="beta"):
        rwr_weights(rewards, beta=-1.0)
    with pytest.raises(ValueError, match="rewards"):
        rwr_weights(jnp.ones((B, T)))
    with pytest.raises(ValueError, match="rewards"):
        rwr_weights(jnp.ones((B,), jnp.int32))
    with pytest.raises(ValueError, match="beta"):
        awr_weights(rewards, beta=0.0)
    with pytest.raises(ValueError, match="max_weight"):
        awr_weights(rewards, max_weight=-1.0)
    with pytest.raises(ValueError, match="advantages"):
        awr_weights(jnp.ones((B, T)))
    logp, mask = jnp.zeros((B, T)), jnp.ones((B, T))
    with pytest.raises(ValueError, match="weights"):
        weighted_nll_loss(logp, mask, jnp.ones((B - 1,)))
    with pytest.raises(ValueError, match="weights"):
        weighted_nll_loss(logp, mask, jnp.ones((B, T)))
    with pytest.raises(ValueError, match="mask"):
        weighted_nll_loss(logp, mask[:, 1:], rewards)
