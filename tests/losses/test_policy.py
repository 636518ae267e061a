import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.policy import grpo_loss, ppo_policy_loss

B, T = 6, 8
MODES = ["token_mean", "sequence_mean", "sequence_sum", "dr_grpo", "dapo"]


# ---------------------------------------------------------------- NumPy oracles (docs/numerics.md)
def right_padded_mask(rng, batch=B, time=T, min_len=1):
    lengths = rng.integers(min_len, time + 1, size=batch)
    return (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)


def np_aggregate(x, mask, mode, max_len=None, global_count=None):
    batch, time = x.shape
    total, count = (x * mask).sum(), mask.sum()
    if mode in ("token_mean", "bnpo"):
        return total / max(count, 1)
    if mode in ("sequence_mean", "grpo"):
        return np.mean((x * mask).sum(1) / np.maximum(mask.sum(1), 1))
    if mode == "sequence_sum":
        return np.mean((x * mask).sum(1))
    if mode == "dr_grpo":
        return total / (batch * (max_len or time))
    if mode == "dapo":
        return total / max(global_count or count, 1)
    raise AssertionError(mode)


def np_ratio(logp, old_logp, mask, level):
    log_ratio = (logp - old_logp).astype(np.float64)
    if level == "sequence":
        row = (log_ratio * mask).sum(1) / np.maximum(mask.sum(1), 1)
        log_ratio = np.repeat(row[:, None], logp.shape[1], axis=1)
    return np.exp(log_ratio)


def np_unit_mean(x, mask, level):
    """Token level: the mean over counted tokens. Sequence level (GSPO, one ratio per response):
    the mean over responses with tokens of each response's token mean."""
    if level == "token":
        return (x * mask).sum() / mask.sum()
    rows = mask.sum(1) > 0
    return ((x * mask).sum(1)[rows] / mask.sum(1)[rows]).mean()


def np_ppo(logp, old_logp, adv, mask, *, eps_low, eps_high, dual_clip=None, level="token", mode="token_mean", **agg):
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    ratio = np_ratio(logp, old_logp, mask, level)
    unclipped = -adv * ratio
    clipped = -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high)
    per_token = np.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = np.where(adv < 0, np.minimum(per_token, -dual_clip * adv), per_token)
    count = mask.sum()
    metrics = {
        "ppo/clipfrac": np_unit_mean((clipped > unclipped).astype(np.float64), mask, level),
        "ppo/approx_kl": 0.5 * (((logp - old_logp) ** 2) * mask).sum() / count,
        "ppo/ratio_mean": np_unit_mean(ratio, mask, level),
        "ppo/ratio_max": ratio[mask > 0].max(),
    }
    return np_aggregate(per_token, mask, mode, **agg), metrics


def np_grpo(logp, old_logp, ref_logp, adv, mask, *, eps_low, eps_high, kl_coef, level="token", mode="grpo",
            kl_logp=None, kl_importance_weighted=False, **agg):
    adv = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp.shape)
    ratio = np_ratio(logp, old_logp, mask, level)
    surrogate = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
    kl_logp = logp if kl_logp is None else kl_logp
    k3 = np.exp(ref_logp - kl_logp) - 1 - (ref_logp - kl_logp)
    if kl_importance_weighted:  # rho * k3: the tokens were drawn from pi_old
        k3 = ratio * k3
    per_token = surrogate + kl_coef * k3
    count = mask.sum()
    metrics = {
        "grpo/kl": (k3 * mask).sum() / count,
        "grpo/ratio_mean": np_unit_mean(ratio, mask, level),
        "grpo/clipfrac": np_unit_mean((np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv < ratio * adv)
                                      .astype(np.float64), mask, level),
    }
    return np_aggregate(per_token, mask, mode, **agg), metrics


def make_batch(seed, advantage_shape="token"):
    """Ratios spread on both sides of [0.8, 1.2], advantages of both signs, right padding."""
    rng = np.random.default_rng(seed)
    old_logp = -rng.uniform(0.1, 3.0, size=(B, T)).astype(np.float32)
    logp = (old_logp + rng.normal(scale=0.4, size=(B, T))).astype(np.float32)
    ref_logp = (old_logp + rng.normal(scale=0.3, size=(B, T))).astype(np.float32)
    adv_shape = (B, T) if advantage_shape == "token" else (B,)
    adv = rng.normal(size=adv_shape).astype(np.float32)
    mask = right_padded_mask(rng)
    ratio = np.exp(logp - old_logp)[mask > 0]
    assert (ratio < 0.8).any() and (ratio > 1.2).any()
    assert (adv > 0).any() and (adv < 0).any()
    return logp, old_logp, ref_logp, adv, mask


def as_jnp(*arrays):
    return [jnp.asarray(a) for a in arrays]


# ---------------------------------------------------------------- PPO
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("advantage_shape", ["token", "sequence"])
@pytest.mark.parametrize(
    "options",
    [
        dict(clip_eps=0.2),
        dict(clip_eps=0.1),
        dict(clip_eps=0.2, clip_eps_low=0.2, clip_eps_high=0.28),
        dict(clip_eps=0.2, dual_clip=3.0),
        dict(clip_eps=0.2, dual_clip=1.5),
    ],
)
def test_ppo_matches_oracle(seed, advantage_shape, options):
    logp, old_logp, _, adv, mask = make_batch(seed, advantage_shape)
    loss, metrics = ppo_policy_loss(*as_jnp(logp, old_logp, adv, mask), **options)
    eps_low = options.get("clip_eps_low") or options["clip_eps"]
    eps_high = options.get("clip_eps_high") or options["clip_eps"]
    expected, expected_metrics = np_ppo(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, dual_clip=options.get("dual_clip")
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["ppo/policy_loss"], expected, rtol=1e-5, atol=1e-6)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    assert 0 < float(metrics["ppo/clipfrac"]) < 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ppo_aggregations_and_gspo_match_oracle(mode, level):
    logp, old_logp, _, adv, mask = make_batch(3, "sequence")
    agg = dict(max_len=12) if mode == "dr_grpo" else dict(global_count=70) if mode == "dapo" else {}
    kwargs = dict(max_len=agg.get("max_len"), global_token_count=agg.get("global_count"))
    loss, metrics = ppo_policy_loss(
        *as_jnp(logp, old_logp, adv, mask), clip_eps=0.2, aggregation=mode, importance_level=level, **kwargs
    )
    expected, expected_metrics = np_ppo(
        logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.2, level=level, mode=mode, **agg
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["ppo/ratio_mean"], expected_metrics["ppo/ratio_mean"], rtol=1e-5)


def test_gspo_equals_token_ppo_when_ratios_are_constant_per_row():
    logp, old_logp, _, adv, mask = make_batch(4, "sequence")
    shift = np.linspace(-0.5, 0.5, B, dtype=np.float32)[:, None]
    logp = old_logp + shift
    args = as_jnp(logp, old_logp, adv, mask)
    token, _ = ppo_policy_loss(*args, importance_level="token")
    sequence, _ = ppo_policy_loss(*args, importance_level="sequence")
    np.testing.assert_allclose(sequence, token, rtol=1e-5)


def grad_wrt_logp(fn, logp, *rest, **kwargs):
    return np.asarray(jax.jit(jax.grad(lambda lp: fn(lp, *rest, **kwargs)[0]))(logp))


def test_ppo_gradient_signs():
    """Raising logp on a positive-advantage token lowers the loss; negative raises it;
    clipped tokens and padding get no gradient; dual-clip caps negative advantages."""
    old_logp = jnp.zeros((1, 6))
    #            in range,   in range,   clipped high, clipped low, dual-capped, padding
    log_ratio = jnp.log(jnp.array([[1.05, 0.95, 1.5, 0.5, 10.0, 1.0]]))
    adv = jnp.array([[1.0, -1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.float32)
    grad = grad_wrt_logp(ppo_policy_loss, old_logp + log_ratio, old_logp, adv, mask, dual_clip=3.0)
    assert grad[0, 0] < 0 and grad[0, 1] > 0
    assert grad[0, 2] == 0 and grad[0, 3] == 0 and grad[0, 4] == 0 and grad[0, 5] == 0
    # Without dual-clip the large-ratio negative-advantage token is pushed down (grad > 0).
    grad = grad_wrt_logp(ppo_policy_loss, old_logp + log_ratio, old_logp, adv, mask)
    assert grad[0, 4] > 0
    loss, metrics = ppo_policy_loss(old_logp + log_ratio, old_logp, adv, mask, dual_clip=3.0)
    np.testing.assert_allclose(metrics["ppo/dual_clipfrac"], 0.2, rtol=1e-6)


def test_ppo_gradients_only_reach_logp():
    logp, old_logp, _, adv, mask = as_jnp(*make_batch(5))
    grads = jax.jit(jax.grad(lambda lp, old, a: ppo_policy_loss(lp, old, a, mask)[0], argnums=(0, 1, 2)))(
        logp, old_logp, adv
    )
    assert np.all(np.isfinite(grads[0])) and np.abs(grads[0]).sum() > 0
    assert np.all(grads[0][np.asarray(mask) == 0] == 0)
    assert np.all(grads[1] == 0) and np.all(grads[2] == 0)


def test_ppo_on_policy_gradient_is_minus_advantage_over_count():
    logp, _, _, adv, mask = make_batch(6)
    grad = grad_wrt_logp(ppo_policy_loss, *as_jnp(logp, logp, adv, mask))
    np.testing.assert_allclose(grad, -adv * mask / mask.sum(), rtol=1e-5, atol=1e-7)


def test_padding_garbage_does_not_leak():
    logp, old_logp, _, adv, mask = make_batch(7)
    dirty_logp = np.where(mask > 0, logp, 500.0).astype(np.float32)
    dirty_old = np.where(mask > 0, old_logp, -np.inf).astype(np.float32)
    clean_loss, clean_metrics = ppo_policy_loss(*as_jnp(logp, old_logp, adv, mask))
    loss, metrics = ppo_policy_loss(*as_jnp(dirty_logp, dirty_old, adv, mask))
    np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
    for key in clean_metrics:
        np.testing.assert_allclose(metrics[key], clean_metrics[key], rtol=1e-6, err_msg=key)
    grad = grad_wrt_logp(ppo_policy_loss, *as_jnp(dirty_logp, dirty_old, adv, mask))
    assert np.all(np.isfinite(grad))


def test_ppo_jit_and_vmap_match_eager():
    logp, old_logp, _, adv, mask = as_jnp(*make_batch(8))
    fn = functools.partial(ppo_policy_loss, clip_eps_high=0.3, dual_clip=2.0, aggregation="grpo")
    eager_loss, eager_metrics = fn(logp, old_logp, adv, mask)
    jit_loss, jit_metrics = jax.jit(fn)(logp, old_logp, adv, mask)
    np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6)
    stacked = [jnp.stack([x, x[::-1]]) for x in (logp, old_logp, adv, mask)]
    vmapped, _ = jax.vmap(fn)(*stacked)
    np.testing.assert_allclose(vmapped[0], eager_loss, rtol=1e-6)
    # Static options through static_argnames.
    static_jit = jax.jit(ppo_policy_loss, static_argnames=("aggregation", "importance_level"))
    loss, _ = static_jit(logp, old_logp, adv, mask, aggregation="sequence_sum", importance_level="sequence")
    eager, _ = ppo_policy_loss(logp, old_logp, adv, mask, aggregation="sequence_sum", importance_level="sequence")
    np.testing.assert_allclose(loss, eager, rtol=1e-6)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**16),
    eps_low=st.floats(0.05, 0.5),
    eps_high=st.floats(0.05, 0.5),
)
def test_ppo_is_a_pessimistic_bound(seed, eps_low, eps_high):
    """The clipped loss is never below the unclipped surrogate, and equals it when nothing clips."""
    logp, old_logp, _, adv, mask = make_batch(seed % 50)
    loss, metrics = ppo_policy_loss(*as_jnp(logp, old_logp, adv, mask), clip_eps_low=eps_low, clip_eps_high=eps_high)
    unclipped = (-adv * np.exp(logp - old_logp) * mask).sum() / mask.sum()
    assert float(loss) >= unclipped - 1e-5
    expected, _ = np_ppo(logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high)
    np.testing.assert_allclose(loss, expected, rtol=1e-4, atol=1e-5)


def test_ppo_bad_inputs_raise():
    logp, old_logp, _, adv, mask = as_jnp(*make_batch(9))
    with pytest.raises(ValueError, match="aggregation"):
        ppo_policy_loss(logp, old_logp, adv, mask, aggregation="average")
    with pytest.raises(ValueError, match="importance_level"):
        ppo_policy_loss(logp, old_logp, adv, mask, importance_level="segment")
    with pytest.raises(ValueError, match="old_logp"):
        ppo_policy_loss(logp, old_logp[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="mask"):
        ppo_policy_loss(logp, old_logp, adv, mask[:-1])
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old_logp, adv[0], mask)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(logp, old_logp, adv[:, :-1], mask)
    with pytest.raises(ValueError, match="logp"):
        ppo_policy_loss(logp[0], old_logp[0], adv[0], mask[0])
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(logp, old_logp, adv, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps_low"):
        ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="logp"):
        ppo_policy_loss(logp.astype(jnp.int32), old_logp, adv, mask)


# ---------------------------------------------------------------- GRPO family
@pytest.mark.parametrize(
    "options",
    [
        dict(),  # GRPO defaults
        dict(kl_coef=0.1, clip_eps_low=0.1, clip_eps_high=0.3),
        dict(kl_coef=0.0, clip_eps_low=0.2, clip_eps_high=0.28, aggregation="dapo"),  # DAPO
        dict(kl_coef=0.0, aggregation="dr_grpo", max_len=10),  # Dr. GRPO
        dict(aggregation="bnpo"),
        dict(importance_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4),  # GSPO
        dict(importance_level="sequence", kl_coef=0.0),
        dict(clip_eps=0.1),  # symmetric, as in ppo_policy_loss
        dict(clip_eps=0.1, clip_eps_high=0.28),  # one side overridden
        dict(kl_coef=0.1, kl_importance_weighted=True),  # TRL's use_bias_correction_kl
        dict(importance_level="sequence", kl_importance_weighted=True, aggregation="dapo"),
    ],
)
@pytest.mark.parametrize("advantage_shape", ["sequence", "token"])
def test_grpo_matches_oracle(options, advantage_shape):
    logp, old_logp, ref_logp, adv, mask = make_batch(10, advantage_shape)
    loss, metrics = grpo_loss(*as_jnp(logp, old_logp, ref_logp, adv, mask), **options)
    agg = {"max_len": options["max_len"]} if "max_len" in options else {}
    expected, expected_metrics = np_grpo(
        logp, old_logp, ref_logp, adv, mask,
        eps_low=options.get("clip_eps_low", options.get("clip_eps", 0.2)),
        eps_high=options.get("clip_eps_high", options.get("clip_eps", 0.2)), kl_coef=options.get("kl_coef", 0.04), level=options.get("importance_level", "token"),
        mode=options.get("aggregation", "grpo"), kl_importance_weighted=options.get("kl_importance_weighted", False),
        **agg,
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["grpo/loss"], expected, rtol=1e-5, atol=1e-6)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_grpo_kl_term_reads_kl_logp():
    """`kl_logp` (the unfiltered softmax's log-probs of a top-k / top-p rollout) replaces `logp`
    in the k3 term only: the ratios still read `logp`; the KL's gradient flows to `kl_logp`."""
    logp, old_logp, ref_logp, adv, mask = make_batch(13, "sequence")
    kl_logp = logp - np.random.default_rng(14).uniform(0.0, 0.5, logp.shape).astype(np.float32)
    loss, metrics = grpo_loss(*as_jnp(logp, old_logp, ref_logp, adv, mask), kl_coef=0.1, kl_logp=jnp.asarray(kl_logp))
    expected, expected_metrics = np_grpo(logp, old_logp, ref_logp, adv, mask, eps_low=0.2, eps_high=0.2,
                                         kl_coef=0.1, kl_logp=kl_logp)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    for key, value in expected_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    grad = jax.grad(lambda k: grpo_loss(*as_jnp(logp, old_logp, ref_logp, adv, mask), kl_coef=0.1, kl_logp=k)[0])(
        jnp.asarray(kl_logp))
    per_token = 0.1 * (1 - np.exp(ref_logp - kl_logp)) * mask / mask.sum(1, keepdims=True) / B  # d k3 / d kl_logp
    np.testing.assert_allclose(grad, per_token, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="kl_logp"):
        grpo_loss(*as_jnp(logp, old_logp, ref_logp, adv, mask), kl_logp=jnp.asarray(kl_logp[:, :-1]))


def test_grpo_without_reference_when_kl_coef_is_zero():
    logp, old_logp, ref_logp, adv, mask = as_jnp(*make_batch(11, "sequence"))
    with_ref, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask, kl_coef=0.0)
    without_ref, metrics = grpo_loss(logp, old_logp, None, adv, mask, kl_coef=0.0)
    np.testing.assert_allclose(without_ref, with_ref, rtol=1e-6)
    assert "grpo/kl" not in metrics  # no KL was computed: none is reported (a 0 would read as "at the reference")
    assert float(grpo_loss(logp, old_logp, ref_logp, adv, mask, kl_coef=0.0)[1]["grpo/kl"]) > 0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old_logp, None, adv, mask, kl_coef=0.04)


def test_grpo_single_update_gradient_matches_analytic_form():
    """With old_logp = logp the gradient per token is (-A + kl_coef*(1 - exp(ref - logp))) / (B * n_b)."""
    logp, _, ref_logp, adv, mask = make_batch(12, "sequence")
    kl_coef = 0.1
    grad = grad_wrt_logp(grpo_loss, *as_jnp(logp, logp, ref_logp, adv, mask), kl_coef=kl_coef)
    per_token = -adv[:, None] + kl_coef * (1 - np.exp(ref_logp - logp))
    expected = per_token * mask / mask.sum(1, keepdims=True) / B
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
    assert np.all(np.sign(grad[mask > 0]) == np.sign(expected[mask > 0]))
    # importance-weighted KL (rho * k3): at rho = 1 the ratio's gradient adds k3 itself
    grad = grad_wrt_logp(grpo_loss, *as_jnp(logp, logp, ref_logp, adv, mask), kl_coef=kl_coef,
                         kl_importance_weighted=True)
    k3 = np.exp(ref_logp - logp) - 1 - (ref_logp - logp)
    per_token = -adv[:, None] + kl_coef * (k3 + 1 - np.exp(ref_logp - logp))
    np.testing.assert_allclose(grad, per_token * mask / mask.sum(1, keepdims=True) / B, rtol=1e-4, atol=1e-6)


def test_grpo_kl_pulls_towards_reference():
    """With zero advantages only the k3 term acts: logp above ref is pushed down and vice versa."""
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref_logp = jnp.array([[-1.5, -1.0, -0.5]])
    grad = grad_wrt_logp(grpo_loss, logp, logp, ref_logp, jnp.zeros((1,)), jnp.ones((1, 3)), kl_coef=1.0)
    assert grad[0, 0] > 0 and grad[0, 1] < 0 and abs(grad[0, 2]) < 1e-7


def test_grpo_jit_matches_eager_and_bad_inputs_raise():
    logp, old_logp, ref_logp, adv, mask = as_jnp(*make_batch(13, "sequence"))
    fn = jax.jit(grpo_loss, static_argnames=("aggregation", "importance_level", "max_len"))
    for options in (dict(aggregation="dapo", kl_coef=0.0), dict(importance_level="sequence")):
        jit_loss, _ = fn(logp, old_logp, ref_logp, adv, mask, **options)
        eager_loss, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask, **options)
        np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old_logp, ref_logp[:, 1:], adv, mask)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, aggregation="gspo")
    with pytest.raises(ValueError, match="clip_eps_high"):
        grpo_loss(logp, old_logp, ref_logp, adv, mask, clip_eps_high=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old_logp, ref_logp, adv[:-1], mask)
