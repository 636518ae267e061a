"""kto_loss against a NumPy oracle written from docs/numerics.md, plus properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.kto import kto_loss

BATCH = 8


def sigmoid(x):
    return np.exp(-np.logaddexp(0.0, -x))


def kto_oracle(policy, ref, desirable, *, beta, w_d=1.0, w_u=1.0, kl_policy=None, kl_ref=None):
    h = policy.astype(np.float64) - ref.astype(np.float64)
    if kl_policy is None:
        z0 = max(h.mean(), 0.0)
    else:
        z0 = max((kl_policy.astype(np.float64) - kl_ref.astype(np.float64)).mean(), 0.0)
    losses = np.where(desirable, w_d * (1 - sigmoid(beta * (h - z0))), w_u * (1 - sigmoid(beta * (z0 - h))))
    # d loss / d h with z0 held fixed (it is detached)
    grads = np.where(
        desirable,
        -w_d * beta * sigmoid(beta * (h - z0)) * (1 - sigmoid(beta * (h - z0))),
        w_u * beta * sigmoid(beta * (z0 - h)) * (1 - sigmoid(beta * (z0 - h))),
    ) / len(h)
    return losses.mean(), z0, grads


def make_batch(seed, shift=0.0):
    rng = np.random.default_rng(seed)
    policy = rng.uniform(-50.0, -5.0, BATCH)
    ref = policy - shift + 3.0 * rng.standard_normal(BATCH)
    desirable = np.zeros(BATCH, bool)
    desirable[rng.permutation(BATCH)[: BATCH // 2 + 1]] = True
    kl_policy = rng.uniform(-50.0, -5.0, 5)
    kl_ref = kl_policy - shift - rng.uniform(-1.0, 3.0, 5)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return f32(policy), f32(ref), desirable, f32(kl_policy), f32(kl_ref)


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 1.0), (1.0, 0.5)])
@pytest.mark.parametrize("shift", [-2.0, 2.0])  # negative shift: the KL estimate clamps to 0
def test_matches_oracle(beta, weights, shift):
    policy, ref, desirable, kl_policy, kl_ref = make_batch(seed=int(beta * 100), shift=shift)
    w_d, w_u = weights
    for use_kl in (False, True):
        kl_args = dict(kl_policy_logps=kl_policy, kl_ref_logps=kl_ref) if use_kl else {}
        oracle_kl = dict(kl_policy=kl_policy, kl_ref=kl_ref) if use_kl else {}

        def loss_fn(policy_logps):
            return kto_loss(policy_logps, ref, desirable, beta=beta, desirable_weight=w_d,
                            undesirable_weight=w_u, **kl_args)

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(policy))
        expected, z0, expected_grad = kto_oracle(policy, ref, desirable, beta=beta, w_d=w_d, w_u=w_u,
                                                 **oracle_kl)
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(metrics["kto/kl"]), z0, rtol=1e-5, atol=1e-6)
        # z0 is detached: the gradient is the oracle's with z0 held fixed.
        np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-9)
        assert np.all(np.asarray(grad)[desirable] <= 0) and np.all(np.asarray(grad)[~desirable] >= 0)
        if shift < 0 and not use_kl:
            assert float(metrics["kto/kl"]) == 0.0


def test_metrics():
    policy, ref, desirable, _, _ = make_batch(seed=3)
    beta = 0.2
    _, metrics = kto_loss(policy, ref, desirable, beta=beta)
    rewards = beta * (policy.astype(np.float64) - ref)
    np.testing.assert_allclose(float(metrics["kto/rewards_chosen"]), rewards[desirable].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kto/rewards_rejected"]), rewards[~desirable].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kto/margin"]),
                               rewards[desirable].mean() - rewards[~desirable].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kto/fraction_desirable"]), desirable.mean())
    # A batch with only desirable rows: rejected metrics fall back to 0, nothing is NaN.
    loss, metrics = kto_loss(policy, ref, np.ones(BATCH, bool))
    assert np.isfinite(float(loss)) and float(metrics["kto/rewards_rejected"]) == 0.0


def test_integer_labels_jit_and_sharded_reference_point():
    policy, ref, desirable, kl_policy, kl_ref = make_batch(seed=5, shift=1.0)
    eager, _ = kto_loss(policy, ref, desirable)
    as_int, _ = kto_loss(policy, ref, desirable.astype(np.int32))
    jitted, _ = jax.jit(lambda p, r, d: kto_loss(p, r, d, beta=0.1))(policy, ref, desirable)
    np.testing.assert_allclose(float(as_int), float(eager), rtol=1e-7)
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)
    # Split into 2 shards along a named axis: with axis_name the shards share the global z0,
    # so the mean of per-shard losses equals the whole-batch loss.
    shards = [a.reshape(2, BATCH // 2) for a in (policy, ref, desirable)]
    per_shard, metrics = jax.vmap(lambda p, r, d: kto_loss(p, r, d, axis_name="shards"), axis_name="shards")(*shards)
    np.testing.assert_allclose(float(per_shard.mean()), float(eager), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(metrics["kto/kl"]), float(kto_loss(policy, ref, desirable)[1]["kto/kl"]),
                               rtol=1e-6)


def test_extreme_inputs_are_finite():
    policy = jnp.array([1e3, -1e3, 5e2, -5e2], jnp.float32)
    ref = jnp.zeros(4, jnp.float32)
    desirable = jnp.array([True, True, False, False])
    loss, grad = jax.value_and_grad(lambda p: kto_loss(p, ref, desirable)[0])(policy)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_invalid_inputs_raise():
    policy, ref, desirable, kl_policy, kl_ref = make_batch(seed=7)
    with pytest.raises(ValueError, match="ref_logps"):
        kto_loss(policy, ref[:3], desirable)
    with pytest.raises(ValueError, match="is_desirable"):
        kto_loss(policy, ref, desirable[:3])
    with pytest.raises(ValueError, match="policy_logps"):
        kto_loss(policy[:, None], ref, desirable)
    with pytest.raises(ValueError, match="kl_ref_logps"):
        kto_loss(policy, ref, desirable, kl_policy_logps=kl_policy)
    with pytest.raises(ValueError, match="kl_ref_logps"):
        kto_loss(policy, ref, desirable, kl_policy_logps=kl_policy, kl_ref_logps=kl_ref[:2])
    with pytest.raises(ValueError, match="beta"):
        kto_loss(policy, ref, desirable, beta=-0.1)


def test_an_empty_batch_raises_instead_of_returning_nan():
    empty = jnp.zeros(0, jnp.float32)
    with pytest.raises(ValueError, match="`policy_logps` is empty"):
        kto_loss(empty, empty, jnp.zeros(0, bool))
