import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops.rewards import shape_rewards

BATCH, TIME = 5, 8


def oracle_shape_rewards(scores, logp, ref_logp, mask, kl_coef, kind, has_eos=None, missing_eos_score=None,
                         score_clip=None):
    batch, time = logp.shape
    rewards = np.zeros((batch, time))
    for b in range(batch):
        score = float(scores[b])
        if score_clip is not None:
            score = min(max(score, -score_clip), score_clip)
        if has_eos is not None and missing_eos_score is not None and not has_eos[b]:
            score = missing_eos_score
        last = None
        for t in range(time):
            if mask[b, t]:
                log_ratio = float(ref_logp[b, t]) - float(logp[b, t])
                kl = {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": np.exp(log_ratio) - 1 - log_ratio}[kind]
                rewards[b, t] = -kl_coef * kl
                last = t
        if last is not None:
            rewards[b, last] += score
    return rewards


def random_rollout(seed, left=False):
    rng = np.random.default_rng(seed)
    scores = (rng.normal(size=BATCH) * 2.5).astype(np.float32)
    logp = -rng.exponential(1.5, size=(BATCH, TIME)).astype(np.float32)
    ref_logp = np.minimum(logp + rng.normal(scale=0.5, size=(BATCH, TIME)), 0.0).astype(np.float32)
    lengths = rng.integers(1, TIME + 1, size=BATCH)
    lengths[0], lengths[1] = TIME, 0  # a full row and an empty row
    positions = np.arange(TIME)[None, :]
    mask = positions >= (TIME - lengths)[:, None] if left else positions < lengths[:, None]
    has_eos = rng.random(BATCH) < 0.6
    return scores, logp, ref_logp, mask, has_eos


jit_shape_rewards = jax.jit(
    shape_rewards, static_argnames=("kl_estimator", "missing_eos_score", "score_clip")
)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05, 0.2])
def test_shape_rewards_match_oracle(kind, kl_coef):
    scores, logp, ref_logp, mask, _ = random_rollout(seed=int(kl_coef * 100))
    want = oracle_shape_rewards(scores, logp, ref_logp, mask, kl_coef, kind)
    for fn in (shape_rewards, jit_shape_rewards):
        got = fn(scores, logp, ref_logp, mask.astype(np.float32), kl_coef=kl_coef, kl_estimator=kind)
        assert got.shape == (BATCH, TIME) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got[1]) == 0.0)  # the empty row


@pytest.mark.parametrize("left", [False, True])
def test_missing_eos_and_score_clip(left):
    scores, logp, ref_logp, mask, has_eos = random_rollout(seed=3, left=left)
    for missing_eos_score, score_clip in [(-1.0, None), (None, 1.5), (-0.75, 1.0)]:
        want = oracle_shape_rewards(scores, logp, ref_logp, mask, 0.1, "k1", has_eos, missing_eos_score, score_clip)
        for fn in (shape_rewards, jit_shape_rewards):
            got = fn(scores, logp, ref_logp, mask, kl_coef=0.1, has_eos=has_eos,
                     missing_eos_score=missing_eos_score, score_clip=score_clip)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # has_eos alone changes nothing
    np.testing.assert_allclose(
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, has_eos=has_eos),
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1), rtol=1e-7,
    )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), kl_coef=st.floats(0.0, 1.0), left=st.booleans())
def test_rewards_sum_to_score_minus_penalty(seed, kl_coef, left):
    scores, logp, ref_logp, mask, _ = random_rollout(seed, left=left)
    rewards = np.asarray(jit_shape_rewards(scores, logp, ref_logp, mask, kl_coef=kl_coef), np.float64)
    penalty = kl_coef * np.sum((logp.astype(np.float64) - ref_logp) * mask, axis=1)
    has_tokens = mask.any(axis=1)
    np.testing.assert_allclose(rewards.sum(axis=1), np.where(has_tokens, scores, 0.0) - penalty, rtol=1e-4, atol=1e-4)
    assert np.all(rewards[~mask] == 0.0)


def test_traced_kl_coef_and_nonfinite_padding():
    scores, logp, ref_logp, mask, _ = random_rollout(seed=5)
    want = oracle_shape_rewards(scores, logp, ref_logp, mask, 0.3, "k3")
    bad_logp = np.where(mask, logp, -np.inf).astype(np.float32)
    bad_ref = np.where(mask, ref_logp, np.nan).astype(np.float32)
    run = jax.jit(lambda s, a, b, m, c: shape_rewards(s, a, b, m, kl_coef=c, kl_estimator="k3"))
    got = run(scores, bad_logp, bad_ref, mask, jnp.float32(0.3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    per_row = jax.vmap(lambda s, a, b, m: shape_rewards(s[None], a[None], b[None], m[None], kl_coef=0.3,
                                                         kl_estimator="k3")[0])(scores, logp, ref_logp, mask)
    np.testing.assert_allclose(per_row, want, rtol=1e-5, atol=1e-6)


def test_gradients():
    scores, logp, ref_logp, mask, has_eos = random_rollout(seed=6)
    mask_f = mask.astype(np.float32)
    grad_logp = jax.jit(jax.grad(lambda x: shape_rewards(scores, x, ref_logp, mask, kl_coef=0.2).sum()))(logp)
    np.testing.assert_allclose(grad_logp, -0.2 * mask_f, rtol=1e-6)  # more policy log-prob, more penalty
    grad_coef = jax.grad(lambda c: shape_rewards(scores, logp, ref_logp, mask, kl_coef=c).sum())(0.2)
    np.testing.assert_allclose(grad_coef, -np.sum((logp - ref_logp) * mask_f), rtol=1e-5)
    grad_scores = jax.jit(jax.grad(lambda s: shape_rewards(s, logp, ref_logp, mask, kl_coef=0.2, has_eos=has_eos,
                                                            missing_eos_score=-1.0).sum()))(scores)
    np.testing.assert_allclose(grad_scores, (mask.any(axis=1) & has_eos).astype(np.float32))


def test_bad_inputs_raise():
    scores, logp, ref_logp, mask, has_eos = random_rollout(seed=7)
    with pytest.raises(ValueError, match="`ref_logp` has shape"):
        shape_rewards(scores, logp, ref_logp[:, 1:], mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="`mask` has shape"):
        shape_rewards(scores, logp, ref_logp, mask[:, 1:], kl_coef=0.1)
    with pytest.raises(ValueError, match=r"`scores` must have shape \(5,\)"):
        shape_rewards(scores[:3], logp, ref_logp, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="`scores` must have rank 1"):
        shape_rewards(scores[:, None], logp, ref_logp, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="`kl_estimator` must be one of"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, kl_estimator="full")
    with pytest.raises(ValueError, match="`missing_eos_score` needs `has_eos`"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, missing_eos_score=-1.0)
    with pytest.raises(ValueError, match="`has_eos` must have shape"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, has_eos=has_eos[:2], missing_eos_score=-1.0)
    with pytest.raises(ValueError, match="`kl_coef` must be a scalar"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=np.ones(5))
    with pytest.raises(ValueError, match="`score_clip` must be > 0"):
        shape_rewards(scores, logp, ref_logp, mask, kl_coef=0.1, score_clip=0.0)
    with pytest.raises(ValueError, match="`logp` must have rank 2"):
        shape_rewards(scores, logp[0], ref_logp[0], mask[0], kl_coef=0.1)
