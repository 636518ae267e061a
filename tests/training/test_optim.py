"""Optimizer chain: schedule, decay mask, clipping, accumulation, non-finite handling.

Expectations come from NumPy formulas written here (AdamW: Loshchilov & Hutter 2019)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.training.optim import (
    OptimizerConfig,
    accumulate_gradients,
    check_finite,
    decay_mask,
    make_optimizer,
    make_schedule,
    optimizer_metrics,
)
from rlhf_jax.typed_config import ConfigError, load_config


def schedule_oracle(step, lr, warmup, total, kind, end_ratio):
    end = end_ratio * lr
    if step < warmup:
        return lr * step / warmup
    if kind == "constant":
        return lr
    frac = min(step - warmup, total - warmup) / (total - warmup)
    if kind == "linear":
        return lr + (end - lr) * frac
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["cosine", "linear", "constant"]),
    warmup=st.integers(0, 20),
    decay=st.integers(1, 50),
    end_ratio=st.sampled_from([0.0, 0.1, 0.5]),
    lr=st.sampled_from([1e-5, 3e-4, 0.7]),
)
def test_schedule_matches_hand_formula(kind, warmup, decay, end_ratio, lr):
    config = OptimizerConfig(learning_rate=lr, warmup_steps=warmup, total_steps=warmup + decay,
                             schedule=kind, end_lr_ratio=end_ratio)
    schedule = make_schedule(config)
    steps = sorted({0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, warmup + decay // 2,
                    warmup + decay - 1, warmup + decay, warmup + decay + 7})
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([schedule_oracle(s, lr, warmup, warmup + decay, kind, end_ratio) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=lr * 1e-6)


def test_schedule_under_jit_and_peak_after_warmup():
    config = OptimizerConfig(learning_rate=0.1, warmup_steps=4, total_steps=20, schedule="linear",
                             end_lr_ratio=0.2)
    schedule = make_schedule(config)
    steps = jnp.arange(25)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), [schedule(int(s)) for s in steps], rtol=1e-6)
    assert float(schedule(4)) == pytest.approx(0.1)
    assert float(schedule(24)) == pytest.approx(0.02)


@pytest.mark.parametrize(
    "overrides",
    [dict(schedule="step"), dict(nonfinite="ignore"), dict(learning_rate=0.0), dict(warmup_steps=-1),
     dict(warmup_steps=10, total_steps=10), dict(end_lr_ratio=1.5), dict(b2=1.0), dict(eps=0.0),
     dict(weight_decay=-0.1), dict(max_grad_norm=-1.0)],
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        OptimizerConfig(**overrides)


def toy_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
        "norm": {"scale": jnp.asarray(1.0 + rng.normal(size=(3,)), jnp.float32)},
        "embed": jnp.asarray(rng.normal(size=(5, 2, 2)), jnp.float32),
        "temperature": jnp.asarray(0.5, jnp.float32),
    }


def test_decay_mask_by_rank():
    mask = decay_mask(toy_params())
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False},
                    "embed": True, "temperature": False}


def test_weight_decay_shrinks_only_matrices():
    lr, wd = 0.1, 0.3
    config = OptimizerConfig(learning_rate=lr, schedule="constant", weight_decay=wd)
    optimizer = make_optimizer(config)
    params = toy_params()
    opt_state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(optimizer.update)
    for step in range(3):
        updates, opt_state = update(zeros, opt_state, params)
        params = optax.apply_updates(params, updates)
    start = toy_params()
    factor = (1.0 - lr * wd) ** 3
    np.testing.assert_allclose(params["dense"]["kernel"], start["dense"]["kernel"] * factor, rtol=1e-6)
    np.testing.assert_allclose(params["embed"], start["embed"] * factor, rtol=1e-6)
    np.testing.assert_array_equal(params["dense"]["bias"], start["dense"]["bias"])
    np.testing.assert_array_equal(params["norm"]["scale"], start["norm"]["scale"])
    np.testing.assert_array_equal(params["temperature"], start["temperature"])


def adamw_oracle(params, grads_seq, *, lr, b1, b2, eps, wd, max_norm):
    """NumPy AdamW with global-norm clipping and a rank >= 2 decay mask, constant LR."""
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
        scale = min(1.0, max_norm / norm)
        for k in params:
            g = np.asarray(grads[k], np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = wd * params[k] if params[k].ndim >= 2 else 0.0
            params[k] = params[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    return params


def test_clipping_matches_adamw_oracle():
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=(4,))}
    huge = {"w": 1e3 * rng.normal(size=(3, 4)), "b": 1e3 * rng.normal(size=(4,))}
    small = {"w": 0.05 * rng.normal(size=(3, 4)), "b": 0.05 * rng.normal(size=(4,))}
    hyper = dict(lr=0.01, b1=0.9, b2=0.99, eps=1e-3, wd=0.1, max_norm=0.5)
    config = OptimizerConfig(learning_rate=hyper["lr"], schedule="constant", b1=hyper["b1"],
                             b2=hyper["b2"], eps=hyper["eps"], weight_decay=hyper["wd"],
                             max_grad_norm=hyper["max_norm"])
    optimizer = make_optimizer(config)
    as_f32 = lambda tree: {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}
    current = as_f32(params)
    opt_state = optimizer.init(current)
    update = jax.jit(optimizer.update)
    for grads in (huge, small):
        updates, opt_state = update(as_f32(grads), opt_state, current)
        current = optax.apply_updates(current, updates)
    want = adamw_oracle(params, [huge, small], **hyper)
    for key in params:
        np.testing.assert_allclose(current[key], want[key], rtol=1e-5, atol=1e-6)
    unclipped = adamw_oracle(params, [huge, small], **{**hyper, "max_norm": 1e12})
    assert not np.allclose(want["w"], unclipped["w"], atol=1e-4)  # clipping changes the result


def regression_loss(params, batch):
    pred = batch["x"] @ params["w"] + params["b"]
    err = pred - batch["y"]
    return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err)), "count": jnp.asarray(err.shape[0])}


def regression_problem(seed=0, batch=16):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
    data = {"x": jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
            "y": jnp.asarray(rng.normal(size=(batch, 2)), jnp.float32)}
    return params, data


def test_grad_accum_steps_is_not_an_optimizer_key():
    """Accumulation is `train.num_microbatches` only; the removed key is an unknown key."""
    with pytest.raises(ConfigError, match="unknown config key 'grad_accum_steps'"):
        load_config(OptimizerConfig, overrides=["grad_accum_steps=4"])


@pytest.mark.parametrize("num_microbatches", [1, 4])
def test_accumulate_gradients_equals_big_batch(num_microbatches):
    params, data = regression_problem(seed=3)
    (want_loss, want_aux), want_grads = jax.value_and_grad(regression_loss, has_aux=True)(params, data)
    run = jax.jit(accumulate_gradients, static_argnums=(0, 3))
    loss, aux, grads = run(regression_loss, params, data, num_microbatches)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["mae"], want_aux["mae"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, want_grads)
    assert loss.dtype == jnp.float32 and grads["w"].dtype == jnp.float32
    # eager, without aux, gives the same numbers
    plain_loss, none, plain_grads = accumulate_gradients(
        lambda p, b: regression_loss(p, b)[0], params, data, num_microbatches, has_aux=False)
    assert none is None
    np.testing.assert_allclose(plain_loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(plain_grads["w"], want_grads["w"], rtol=1e-5, atol=1e-6)


def test_accumulate_gradients_rejects_uneven_split():
    params, data = regression_problem(batch=10)
    with pytest.raises(ValueError, match="microbatches"):
        accumulate_gradients(regression_loss, params, data, 4)
    with pytest.raises(ValueError):
        accumulate_gradients(regression_loss, params, data, 0)


def test_skip_policy_drops_nan_gradients_and_counts_them():
    params, data = regression_problem()
    config = OptimizerConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1)
    optimizer = make_optimizer(config)
    schedule = make_schedule(config)
    update = jax.jit(optimizer.update)
    grads = jax.grad(lambda p: regression_loss(p, data)[0])(params)
    nan_grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)

    state = optimizer.init(params)
    updates, state = update(nan_grads, state, params)
    skipped = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, skipped, params)
    assert int(optimizer_metrics(state, schedule)["optim/nonfinite_skips"]) == 1

    # the next finite step is exactly a fresh optimizer's first step
    updates, state = update(grads, state, skipped)
    fresh_updates, _ = update(grads, optimizer.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, updates, fresh_updates)
    assert int(optimizer_metrics(state, schedule)["optim/nonfinite_skips"]) == 1


def test_halt_and_none_policies_let_nan_through():
    params, _ = regression_problem()
    nan_grads = jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params)
    for policy in ("halt", "none"):
        optimizer = make_optimizer(OptimizerConfig(nonfinite=policy, schedule="constant"))
        updates, state = jax.jit(optimizer.update)(nan_grads, optimizer.init(params), params)
        assert not np.isfinite(np.asarray(updates["w"])).any()
        assert int(optimizer_metrics(state, make_schedule(OptimizerConfig()))["optim/nonfinite_skips"]) == 0


def test_check_finite_names_step_and_metric():
    check_finite({"loss": jnp.asarray(1.0), "count": jnp.asarray(3)}, step=5)
    with pytest.raises(FloatingPointError, match=r"step 7.*loss=nan"):
        check_finite({"loss": jnp.asarray(jnp.nan), "acc": jnp.asarray(0.5)}, step=jnp.asarray(7))
    with pytest.raises(FloatingPointError, match="grad_norm"):
        check_finite({"grad_norm": jnp.asarray([1.0, jnp.inf])}, step=0)


def test_learning_rate_metric_follows_applied_updates():
    config = OptimizerConfig(learning_rate=0.1, warmup_steps=3, total_steps=10, schedule="cosine")
    optimizer, schedule = make_optimizer(config), make_schedule(config)
    params, data = regression_problem()
    grads = jax.grad(lambda p: regression_loss(p, data)[0])(params)
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for step in range(5):
        lr = float(optimizer_metrics(state, schedule)["optim/learning_rate"])
        assert lr == pytest.approx(schedule_oracle(step, 0.1, 3, 10, "cosine", 0.0), abs=1e-7)
        _, state = update(grads, state, params)
