import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops.kl import full_kl, kl_estimate
from rlhf_jax.ops.kl_controller import (
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
)

BATCH, TIME, VOCAB = 3, 5, 9


def oracle_kl_estimate(logp, ref_logp, kind):
    logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
    log_ratio = ref_logp - logp
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    return np.exp(log_ratio) - 1.0 - log_ratio


def np_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def oracle_full_kl(logits, ref_logits, temperature=1.0):
    logp, ref_logp = np_log_softmax(logits, temperature), np_log_softmax(ref_logits, temperature)
    probs = np.exp(logp)
    out = np.zeros(logits.shape[:-1])
    for index in np.ndindex(*logits.shape[:-1]):
        out[index] = sum(
            probs[index][v] * (logp[index][v] - ref_logp[index][v])
            for v in range(logits.shape[-1])
            if probs[index][v] > 0
        )
    return out


def random_logps(seed):
    rng = np.random.default_rng(seed)
    logp = -rng.exponential(2.0, size=(BATCH, TIME)).astype(np.float32)
    ref_logp = (logp + rng.normal(scale=0.8, size=(BATCH, TIME))).astype(np.float32)
    return logp, np.minimum(ref_logp, 0.0)


def random_logits(seed, scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(2, BATCH, TIME, VOCAB)) * scale).astype(np.float32)


jit_kl_estimate = jax.jit(kl_estimate, static_argnames="kind")
jit_full_kl = jax.jit(full_kl)


# ---------------------------------------------------------------- estimators


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_matches_oracle(kind):
    for seed in range(3):
        logp, ref_logp = random_logps(seed)
        want = oracle_kl_estimate(logp, ref_logp, kind)
        for fn in (kl_estimate, jit_kl_estimate):
            got = fn(logp, ref_logp, kind=kind)
            assert got.shape == logp.shape and got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert jnp.array_equal(kl_estimate(logp, ref_logp), kl_estimate(logp, ref_logp, kind="k1"))


@settings(max_examples=30, deadline=None)
@given(
    logp=st.floats(-30.0, 0.0, width=32),
    ref_logp=st.floats(-30.0, 0.0, width=32),
)
def test_k3_and_k2_are_non_negative(logp, ref_logp):
    logp_array = jnp.full((2,), logp, jnp.float32)
    ref_array = jnp.full((2,), ref_logp, jnp.float32)
    assert np.all(np.asarray(jit_kl_estimate(logp_array, ref_array, kind="k3")) >= 0.0)
    assert np.all(np.asarray(jit_kl_estimate(logp_array, ref_array, kind="k2")) >= 0.0)


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_estimators_average_to_full_kl(kind):
    # E_{v ~ p}[k(log p_v, log q_v)] = KL(p || q) exactly for k1 and k3.
    logits, ref_logits = random_logits(seed=3)
    logp, ref_logp = np_log_softmax(logits), np_log_softmax(ref_logits)
    per_token = jit_kl_estimate(logp.astype(np.float32), ref_logp.astype(np.float32), kind=kind)
    expectation = np.sum(np.exp(logp) * np.asarray(per_token, np.float64), axis=-1)
    np.testing.assert_allclose(expectation, full_kl(logits, ref_logits), rtol=1e-4, atol=1e-5)


def test_kl_estimate_gradients():
    logp, ref_logp = random_logps(seed=4)
    grad_k1 = jax.grad(lambda x: kl_estimate(x, ref_logp, kind="k1").sum())(logp)
    np.testing.assert_allclose(grad_k1, np.ones_like(logp))
    # d k3 / d logp = 1 - exp(ref_logp - logp): pushes logp towards ref_logp.
    grad_k3 = jax.jit(jax.grad(lambda x: kl_estimate(x, ref_logp, kind="k3").sum()))(logp)
    np.testing.assert_allclose(grad_k3, 1.0 - np.exp(ref_logp.astype(np.float64) - logp), rtol=1e-5, atol=1e-6)
    assert np.all(np.sign(grad_k3) == np.sign(logp - ref_logp))
    per_row = jax.vmap(lambda a, b: kl_estimate(a, b, kind="k2"))(logp, ref_logp)
    np.testing.assert_allclose(per_row, oracle_kl_estimate(logp, ref_logp, "k2"), rtol=1e-5)


# ---------------------------------------------------------------- full KL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_full_kl_matches_oracle(temperature):
    logits, ref_logits = random_logits(seed=5)
    want = oracle_full_kl(logits, ref_logits, temperature)
    for fn in (full_kl, jit_full_kl):
        got = fn(logits, ref_logits, temperature=temperature)
        assert got.shape == (BATCH, TIME) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 10.0]), temperature=st.floats(0.2, 3.0))
def test_full_kl_is_non_negative_and_zero_on_identical_logits(seed, scale, temperature):
    logits, ref_logits = random_logits(seed, scale)
    kl = np.asarray(jit_full_kl(logits, ref_logits, temperature=temperature))
    assert np.all(kl >= -1e-6)
    assert np.all(np.asarray(jit_full_kl(logits, logits, temperature=temperature)) == 0.0)


def test_full_kl_masked_vocabulary_and_gradients():
    logits, ref_logits = random_logits(seed=6)
    logits = logits.copy()
    logits[..., :3] = -np.inf  # p_v = 0: those terms are 0
    got = jit_full_kl(logits, ref_logits)
    np.testing.assert_allclose(got, oracle_full_kl(logits, ref_logits), rtol=1e-5, atol=1e-6)
    grad = jax.jit(jax.grad(lambda l: full_kl(l, ref_logits).sum()))(logits)
    assert np.all(np.isfinite(grad))
    # At p = p_ref the KL is minimal: zero gradient.
    grad_at_ref = jax.jit(jax.grad(lambda l: full_kl(l, ref_logits).sum()))(ref_logits)
    np.testing.assert_allclose(grad_at_ref, 0.0, atol=1e-6)
    # Under jit with a traced temperature.
    traced = jax.jit(lambda a, b, t: full_kl(a, b, temperature=t))(ref_logits, logits, jnp.float32(0.5))
    np.testing.assert_allclose(traced, oracle_full_kl(ref_logits, logits, 0.5), rtol=1e-5, atol=1e-6)


def test_kl_bad_inputs_raise():
    logp, ref_logp = random_logps(seed=7)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        kl_estimate(logp, ref_logp, kind="k4")
    with pytest.raises(ValueError, match="`ref_logp` has shape"):
        kl_estimate(logp, ref_logp[:, :-1])
    with pytest.raises(ValueError, match="`logp` must be a floating-point"):
        kl_estimate(logp.astype(np.int32), ref_logp)
    logits, ref_logits = random_logits(seed=7)
    with pytest.raises(ValueError, match="`ref_logits` has shape"):
        full_kl(logits, ref_logits[..., :-1])
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        full_kl(logits, ref_logits, temperature=-1.0)


# ---------------------------------------------------------------- controllers


def oracle_adaptive(init_coef, target, horizon, kls, n_steps):
    coef = init_coef
    history = []
    for kl in kls:
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        coef = coef * (1.0 + error * n_steps / horizon)
        history.append(coef)
    return np.array(history)


@pytest.mark.parametrize("init_coef,target,horizon,n_steps", [(0.1, 6.0, 10_000, 256), (0.2, 1.5, 100, 8)])
def test_adaptive_controller_matches_oracle(init_coef, target, horizon, n_steps):
    kls = [0.0, 3.0, 6.0, 6.6, 7.0, 30.0, 5.5, 2.0]  # inside and outside the +-20% clip
    controller = adaptive_kl_controller(init_coef, target, horizon)
    assert isinstance(controller, KLController)
    state = controller.init()
    assert isinstance(state, KLControllerState) and state.coef.dtype == jnp.float32
    np.testing.assert_allclose(state.coef, init_coef, rtol=1e-7)
    jit_update = jax.jit(controller.update)
    eager, jitted = state, state
    eager_history, jit_history = [], []
    for kl in kls:
        eager = controller.update(eager, kl, n_steps)
        jitted = jit_update(jitted, jnp.float32(kl), jnp.int32(n_steps))
        eager_history.append(float(eager.coef))
        jit_history.append(float(jitted.coef))
    want = oracle_adaptive(init_coef, target, horizon, kls, n_steps)
    np.testing.assert_allclose(eager_history, want, rtol=1e-5)
    np.testing.assert_allclose(jit_history, want, rtol=1e-5)


def test_adaptive_controller_direction_and_scan():
    controller = adaptive_kl_controller(0.1, 6.0, 1000)
    state = controller.init()
    assert controller.update(state, 12.0, 10).coef > state.coef  # KL too high: penalise more
    assert controller.update(state, 1.0, 10).coef < state.coef  # KL too low: penalise less
    assert controller.update(state, 6.0, 10).coef == state.coef

    def step(state, kl):
        state = controller.update(state, kl, 100)
        return state, state.coef

    kls = jnp.array([10.0, 10.0, 2.0], jnp.float32)
    final, coefs = jax.jit(lambda s, k: jax.lax.scan(step, s, k))(state, kls)
    np.testing.assert_allclose(coefs, oracle_adaptive(0.1, 6.0, 1000, [10.0, 10.0, 2.0], 100), rtol=1e-5)
    assert final.coef == coefs[-1]


def test_fixed_controller_keeps_its_coefficient():
    controller = fixed_kl_controller(0.05)
    state = controller.init()
    for kl in (0.0, 100.0):
        state = jax.jit(controller.update)(state, jnp.float32(kl), 64)
    np.testing.assert_allclose(state.coef, 0.05, rtol=1e-7)
    assert state.coef.dtype == jnp.float32


def test_controller_bad_arguments_raise():
    with pytest.raises(ValueError, match="`target` must be > 0"):
        adaptive_kl_controller(0.1, 0.0, 100)
    with pytest.raises(ValueError, match="`horizon` must be > 0"):
        adaptive_kl_controller(0.1, 6.0, -5)
    with pytest.raises(ValueError, match="`init_coef` must be >= 0"):
        adaptive_kl_controller(-0.1, 6.0, 100)
    with pytest.raises(ValueError, match="`coef` must be >= 0"):
        fixed_kl_controller(-1.0)
    controller = adaptive_kl_controller(0.1, 6.0, 100)
    with pytest.raises(ValueError, match="`current_kl` must be a scalar"):
        controller.update(controller.init(), jnp.ones(3), 1)
