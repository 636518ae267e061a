"""SimPO, CPO and ORPO against NumPy oracles written from docs/numerics.md, plus properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses.reference_free import cpo_loss, log_odds, orpo_loss, simpo_loss

BATCH = 6


def logsig(x):
    return -np.logaddexp(0.0, -x)


def smoothed(z, eps):
    return -(1.0 - eps) * logsig(z) - eps * logsig(-z)


def np_log_odds(x):
    return x - np.log(-np.expm1(x))


def make_batch(seed):
    rng = np.random.default_rng(seed)
    chosen_avg = rng.uniform(-3.0, -0.05, BATCH)
    rejected_avg = rng.uniform(-3.0, -0.05, BATCH)
    lengths = rng.integers(4, 30, BATCH)
    chosen_sum = chosen_avg * lengths
    rejected_sum = rejected_avg * rng.integers(4, 30, BATCH)
    chosen_nll = -chosen_avg + rng.uniform(0.0, 0.2, BATCH)
    return {k: np.asarray(v, np.float32) for k, v in dict(
        chosen_avg=chosen_avg, rejected_avg=rejected_avg, chosen_sum=chosen_sum,
        rejected_sum=rejected_sum, chosen_nll=chosen_nll).items()}


# ----------------------------------------------------------------------------- SimPO
@pytest.mark.parametrize("beta", [1.0, 2.0, 2.5])
@pytest.mark.parametrize("target_margin", [0.0, 0.5, 1.4])
def test_simpo_matches_oracle(beta, target_margin):
    data = make_batch(seed=int(beta * 10 + target_margin * 100))
    w, l = data["chosen_avg"].astype(np.float64), data["rejected_avg"].astype(np.float64)
    for eps in (0.0, 0.15):
        loss, metrics = simpo_loss(data["chosen_avg"], data["rejected_avg"], beta=beta, target_margin=target_margin,
                                   label_smoothing=eps)
        np.testing.assert_allclose(float(loss), smoothed(beta * (w - l) - target_margin, eps).mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["simpo/margin"]), (beta * (w - l)).mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(metrics["simpo/accuracy"]), (w > l).mean())
        np.testing.assert_allclose(float(metrics["simpo/rewards_chosen"]), (beta * w).mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["simpo/rewards_rejected"]), (beta * l).mean(), rtol=1e-5)
        assert float(metrics["simpo/loss"]) == float(loss)


def test_simpo_gradient_signs():
    data = make_batch(seed=1)
    grads = jax.grad(lambda w, l: simpo_loss(w, l)[0], argnums=(0, 1))(data["chosen_avg"], data["rejected_avg"])
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)


# ----------------------------------------------------------------------------- CPO
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("nll_coef", [0.0, 1.0, 0.3])
def test_cpo_matches_oracle(beta, nll_coef):
    data = make_batch(seed=int(beta * 100 + nll_coef * 10))
    w, l = data["chosen_sum"].astype(np.float64), data["rejected_sum"].astype(np.float64)
    nll = data["chosen_nll"].astype(np.float64)
    for eps in (0.0, 0.2):
        loss, metrics = cpo_loss(data["chosen_sum"], data["rejected_sum"], data["chosen_nll"], beta=beta,
                                 nll_coef=nll_coef, label_smoothing=eps)
        preference = smoothed(beta * (w - l), eps).mean()
        np.testing.assert_allclose(float(loss), preference + nll_coef * nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["cpo/preference_loss"]), preference, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["cpo/nll"]), nll.mean(), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["cpo/accuracy"]), (w > l).mean())
        np.testing.assert_allclose(float(metrics["cpo/margin"]), (beta * (w - l)).mean(), rtol=1e-5, atol=1e-6)


def test_cpo_gradients():
    data = make_batch(seed=2)
    grads = jax.grad(lambda w, l, n: cpo_loss(w, l, n, nll_coef=0.7)[0], argnums=(0, 1, 2))(
        data["chosen_sum"], data["rejected_sum"], data["chosen_nll"])
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)
    np.testing.assert_allclose(np.asarray(grads[2]), 0.7 / BATCH, rtol=1e-6)


# ----------------------------------------------------------------------------- ORPO
@pytest.mark.parametrize("odds_ratio_coef", [0.1, 0.5, 2.0])
def test_orpo_matches_oracle(odds_ratio_coef):
    data = make_batch(seed=int(odds_ratio_coef * 10))
    w, l = data["chosen_avg"].astype(np.float64), data["rejected_avg"].astype(np.float64)
    nll = data["chosen_nll"].astype(np.float64)
    loss, metrics = orpo_loss(data["chosen_avg"], data["rejected_avg"], data["chosen_nll"], odds_ratio_coef=odds_ratio_coef)
    ratio = np_log_odds(w) - np_log_odds(l)
    odds_loss = -logsig(ratio).mean()
    np.testing.assert_allclose(float(loss), nll.mean() + odds_ratio_coef * odds_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["orpo/odds_ratio_loss"]), odds_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["orpo/log_odds_ratio"]), ratio.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["orpo/nll"]), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["orpo/accuracy"]), (w > l).mean())
    np.testing.assert_allclose(float(metrics["orpo/margin"]), (w - l).mean(), rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(-80.0, -1e-5))
def test_log_odds_is_accurate(x):
    value = float(log_odds(jnp.float32(x)))
    x32 = float(np.float32(x))
    expected = np_log_odds(np.float64(x32))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


def test_log_odds_and_orpo_stay_finite_at_the_edges():
    edges = jnp.array([0.0, -1e-9, -1e-6, -0.69, -0.7, -50.0, -200.0], jnp.float32)
    values, grads = jax.vmap(jax.value_and_grad(log_odds))(edges)
    assert np.all(np.isfinite(np.asarray(values))) and np.all(np.isfinite(np.asarray(grads)))
    assert np.all(np.diff(np.asarray(values)) <= 0)  # log-odds increase with the log-prob
    rejected = edges[::-1]
    loss_grads = jax.grad(lambda w, l: orpo_loss(w, l, -w)[0], argnums=(0, 1))(edges, rejected)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in loss_grads)


def test_orpo_gradient_signs():
    data = make_batch(seed=4)
    grads = jax.grad(lambda w, l: orpo_loss(w, l, data["chosen_nll"], odds_ratio_coef=0.5)[0], argnums=(0, 1))(
        data["chosen_avg"], data["rejected_avg"])
    assert np.all(np.asarray(grads[0]) < 0) and np.all(np.asarray(grads[1]) > 0)


# ----------------------------------------------------------------------------- shared
def test_jit_matches_eager():
    data = make_batch(seed=5)
    calls = {
        "simpo": (simpo_loss, (data["chosen_avg"], data["rejected_avg"]), dict(beta=2.0, target_margin=0.7)),
        "cpo": (cpo_loss, (data["chosen_sum"], data["rejected_sum"], data["chosen_nll"]), dict(beta=0.2)),
        "orpo": (orpo_loss, (data["chosen_avg"], data["rejected_avg"], data["chosen_nll"]), dict(odds_ratio_coef=0.3)),
    }
    for fn, args, kwargs in calls.values():
        eager_loss, eager_metrics = fn(*args, **kwargs)
        jit_loss, jit_metrics = jax.jit(lambda *a, fn=fn, kwargs=kwargs: fn(*a, **kwargs))(*args)
        np.testing.assert_allclose(float(jit_loss), float(eager_loss), rtol=1e-6)
        for key in eager_metrics:
            np.testing.assert_allclose(float(jit_metrics[key]), float(eager_metrics[key]), rtol=1e-5, atol=1e-7)
    low, _ = simpo_loss(jnp.asarray(data["chosen_avg"], jnp.bfloat16), jnp.asarray(data["rejected_avg"], jnp.bfloat16))
    assert low.dtype == jnp.float32


def test_invalid_inputs_raise():
    data = make_batch(seed=6)
    w, l, n = data["chosen_avg"], data["rejected_avg"], data["chosen_nll"]
    with pytest.raises(ValueError, match="rejected_avg_logps"):
        simpo_loss(w, l[:3])
    with pytest.raises(ValueError, match="chosen_avg_logps"):
        simpo_loss(w[:, None], l)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(w, l, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(w, l, label_smoothing=1.0)
    with pytest.raises(ValueError, match="chosen_nll"):
        cpo_loss(w, l, n[:2])
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo_loss(w, l, n, label_smoothing=-0.2)
    with pytest.raises(ValueError, match="chosen_nll"):
        orpo_loss(w, l, n.reshape(2, 3))
    with pytest.raises(ValueError, match="rejected_avg_logps"):
        orpo_loss(w, np.arange(BATCH), n)


def test_an_empty_batch_raises_instead_of_returning_nan():
    empty = jnp.zeros(0, jnp.float32)
    with pytest.raises(ValueError, match="`chosen_avg_logps` is empty"):
        simpo_loss(empty, empty)
    with pytest.raises(ValueError, match="`chosen_avg_logps` is empty"):
        orpo_loss(empty, empty, empty)
    with pytest.raises(ValueError, match="`chosen_logps` is empty"):
        jax.jit(lambda a: cpo_loss(a, a, a))(empty)
