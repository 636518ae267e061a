"""Reward-model losses and ensembles against NumPy oracles written from docs/numerics.md."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.reward import ensemble_reward_model_loss, ensemble_scores, reward_model_loss

BATCH, MEMBERS = 8, 4


def logsig(x):
    return -np.logaddexp(0.0, -x)


def reward_oracle(chosen, rejected, margin=None, center_coef=0.0):
    chosen, rejected = chosen.astype(np.float64), rejected.astype(np.float64)
    m = 0.0 if margin is None else np.asarray(margin, np.float64)
    loss = -logsig(chosen - rejected - m).mean() + center_coef * ((chosen + rejected) ** 2).mean()
    metrics = {
        "reward/loss": loss,
        "reward/accuracy": (chosen > rejected).mean(),
        "reward/margin": (chosen - rejected).mean(),
        "reward/chosen": chosen.mean(),
        "reward/rejected": rejected.mean(),
    }
    return loss, metrics


def make_scores(seed, shape=(BATCH,)):
    rng = np.random.default_rng(seed)
    chosen = rng.normal(0.5, 1.5, shape).astype(np.float32)
    rejected = rng.normal(-0.2, 1.5, shape).astype(np.float32)
    margin = rng.uniform(0.0, 2.0, shape[-1]).astype(np.float32)
    return chosen, rejected, margin


@pytest.mark.parametrize("center_coef", [0.0, 0.01, 0.5])
def test_reward_model_loss_matches_oracle(center_coef):
    chosen, rejected, margin = make_scores(seed=int(center_coef * 100))
    for m in (None, 0.7, margin):
        loss, metrics = reward_model_loss(chosen, rejected, margin=m, center_coef=center_coef)
        expected, expected_metrics = reward_oracle(chosen, rejected, m, center_coef)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
        assert set(metrics) == set(expected_metrics)
        for key, value in expected_metrics.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_reward_gradients_and_extremes():
    chosen, rejected, _ = make_scores(seed=1)
    grads = jax.grad(lambda c, r: reward_model_loss(c, r)[0], argnums=(0, 1))(chosen, rejected)
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)
    np.testing.assert_allclose(np.asarray(grads[0]), -np.asarray(grads[1]), rtol=1e-6)
    # Centering pulls a shared offset back to zero; the Bradley-Terry term alone ignores it.
    shifted = jax.grad(lambda c: reward_model_loss(c, rejected + 5.0, center_coef=0.1)[0])(chosen + 5.0)
    plain = jax.grad(lambda c: reward_model_loss(c, rejected + 5.0)[0])(chosen + 5.0)
    assert np.all(np.asarray(shifted) > np.asarray(plain))
    extreme = jnp.array([1e3, -1e3, 0.0, 50.0], jnp.float32)
    loss, grad = jax.value_and_grad(lambda c: reward_model_loss(c, -extreme, center_coef=0.1)[0])(extreme)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_jit_vmap_and_dtype():
    chosen, rejected, margin = make_scores(seed=2)
    eager, _ = reward_model_loss(chosen, rejected, margin=margin, center_coef=0.05)
    jitted, _ = jax.jit(lambda c, r, m: reward_model_loss(c, r, margin=m, center_coef=0.05))(chosen, rejected, margin)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    low, _ = reward_model_loss(jnp.asarray(chosen, jnp.bfloat16), jnp.asarray(rejected, jnp.bfloat16))
    assert low.dtype == jnp.float32


def test_ensemble_scores():
    scores = np.random.default_rng(3).normal(size=(MEMBERS, BATCH)).astype(np.float32)
    mean, std = ensemble_scores(scores)
    np.testing.assert_allclose(np.asarray(mean), scores.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(std), scores.astype(np.float64).std(0), rtol=1e-5)
    _, unbiased = jax.jit(lambda s: ensemble_scores(s, ddof=1))(scores)
    np.testing.assert_allclose(np.asarray(unbiased), scores.astype(np.float64).std(0, ddof=1), rtol=1e-5)
    agree = np.tile(scores[:1], (MEMBERS, 1))
    np.testing.assert_allclose(np.asarray(ensemble_scores(agree)[1]), 0.0, atol=1e-6)


@pytest.mark.parametrize("margin_kind", ["none", "scalar", "shared", "per_member"])
def test_ensemble_reward_model_loss(margin_kind):
    chosen, rejected, margin = make_scores(seed=4, shape=(MEMBERS, BATCH))
    margins = {
        "none": [None] * MEMBERS,
        "scalar": [0.3] * MEMBERS,
        "shared": [margin] * MEMBERS,
        "per_member": [margin * (e + 1) for e in range(MEMBERS)],
    }[margin_kind]
    margin_arg = {"none": None, "scalar": 0.3, "shared": margin, "per_member": np.stack(margins)}[margin_kind]
    loss, metrics = ensemble_reward_model_loss(chosen, rejected, margin=margin_arg, center_coef=0.02)
    member = [reward_oracle(chosen[e], rejected[e], margins[e], 0.02) for e in range(MEMBERS)]
    np.testing.assert_allclose(float(loss), np.mean([m[0] for m in member]), rtol=1e-5)
    for key in member[0][1]:
        np.testing.assert_allclose(float(metrics[key]), np.mean([m[1][key] for m in member]), rtol=1e-5,
                                   atol=1e-6, err_msg=key)
    expected_std = 0.5 * (chosen.astype(np.float64).std(0).mean() + rejected.astype(np.float64).std(0).mean())
    np.testing.assert_allclose(float(metrics["reward/ensemble_std"]), expected_std, rtol=1e-5)


def test_invalid_inputs_raise():
    chosen, rejected, margin = make_scores(seed=5)
    with pytest.raises(ValueError, match="rejected_rewards"):
        reward_model_loss(chosen, rejected[:3])
    with pytest.raises(ValueError, match="chosen_rewards"):
        reward_model_loss(chosen[None], rejected)
    with pytest.raises(ValueError, match="margin"):
        reward_model_loss(chosen, rejected, margin=margin[:3])
    with pytest.raises(ValueError, match="margin"):
        reward_model_loss(chosen, rejected, margin=np.ones((2, BATCH), np.float32))
    with pytest.raises(ValueError, match="chosen_rewards"):
        reward_model_loss(np.arange(BATCH), rejected)
    with pytest.raises(ValueError, match="scores"):
        ensemble_scores(chosen)
    with pytest.raises(ValueError, match="ddof"):
        ensemble_scores(chosen[None], ddof=1)
    with pytest.raises(ValueError, match="chosen_rewards"):
        ensemble_reward_model_loss(chosen, rejected)
    stacked = np.stack([chosen, rejected])
    with pytest.raises(ValueError, match="margin"):
        ensemble_reward_model_loss(stacked, stacked, margin=np.ones((3, BATCH), np.float32))


def test_an_empty_batch_raises_instead_of_returning_nan():
    with pytest.raises(ValueError, match="`chosen_rewards` is empty"):
        reward_model_loss(jnp.zeros(0), jnp.zeros(0))
    with pytest.raises(ValueError, match="`chosen_rewards` is empty"):
        ensemble_reward_model_loss(jnp.zeros((3, 0)), jnp.zeros((3, 0)))
