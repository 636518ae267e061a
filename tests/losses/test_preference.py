"""dpo_loss against NumPy oracles written from the docs/numerics.md table, plus properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.losses.preference import DIVERGENCES, DPO_LOSS_TYPES, dpo_loss

BATCH = 8
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}
NEEDS_LENGTHS = {"ipo", "sigmoid_norm"}


# ----------------------------------------------------------------------------- oracle (float64)
def logsig(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(logsig(x))


def divergence_oracle(x, divergence, alpha):
    if divergence == "reverse_kl":
        return x
    if divergence == "forward_kl":
        return 1.0 - np.exp(-x)
    if divergence == "js":
        return np.log(2.0) + logsig(x)
    return (np.exp((alpha - 1.0) * x) - 1.0) / (alpha - 1.0)


def smoothed(z, eps):
    return -(1.0 - eps) * logsig(z) - eps * logsig(-z)


def dpo_oracle(pc, pr, rc, rr, *, loss_type, beta, eps=0.0, lc=None, lr=None, divergence="reverse_kl",
               alpha=0.5, tau=0.05):
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    c, r = pc - rc, pr - rr
    if loss_type in NEEDS_LENGTHS:
        c, r = c / lc, r / lr
    c, r = divergence_oracle(c, divergence, alpha), divergence_oracle(r, divergence, alpha)
    z = beta * (c - r)
    if loss_type == "sigmoid":
        per_pair = smoothed(z, eps)
    elif loss_type == "robust":
        per_pair = (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        per_pair = np.maximum(0.0, 1.0 - z)
    elif loss_type == "ipo":
        per_pair = (c - r - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "exo_pair":
        eps = eps if eps > 0 else 1e-3
        qw, ql = sigmoid(z), sigmoid(-z)
        per_pair = qw * (np.log(qw) - np.log(1 - eps)) + ql * (np.log(ql) - np.log(eps))
    elif loss_type == "nca_pair":
        per_pair = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
    elif loss_type == "bco_pair":
        per_pair = -logsig(beta * c) - logsig(-beta * r)
    elif loss_type == "sppo_hard":
        per_pair = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    elif loss_type == "aot":
        delta = np.sort(pc - pr) - np.sort(rc - rr)
        per_pair = smoothed(beta * delta, eps)
    elif loss_type == "aot_unpaired":
        per_pair = smoothed(beta * (np.sort(c) - np.sort(r)), eps)
    elif loss_type == "apo_zero":
        per_pair = 1 - sigmoid(beta * c) + sigmoid(beta * r)
    elif loss_type == "apo_down":
        per_pair = sigmoid(beta * c) + 1 - sigmoid(z)
    elif loss_type == "discopop":
        m = sigmoid(z / tau)
        per_pair = (1 - m) * (-logsig(z)) + m * np.exp(-z)
    elif loss_type == "sigmoid_norm":
        per_pair = -logsig(z)
    else:
        raise AssertionError(loss_type)
    return per_pair.mean()


# ----------------------------------------------------------------------------- data
def make_batch(seed, batch=BATCH, spread=2.0):
    rng = np.random.default_rng(seed)
    policy_chosen = rng.uniform(-60.0, -5.0, batch)
    policy_rejected = rng.uniform(-60.0, -5.0, batch)
    ref_chosen = policy_chosen + spread * rng.standard_normal(batch)
    ref_rejected = policy_rejected + spread * rng.standard_normal(batch)
    chosen_lengths = rng.integers(3, 40, batch)
    rejected_lengths = rng.integers(3, 40, batch)
    logps = tuple(np.asarray(a, np.float32) for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return logps, chosen_lengths.astype(np.int32), rejected_lengths.astype(np.int32)


def eps_values(loss_type):
    if loss_type == "robust":
        return (0.0, 0.1, 0.4)
    if loss_type in SMOOTHED:
        return (0.0, 0.1, 0.3)
    return (0.0,)


def run(logps, lengths, **kwargs):
    lc, lr = lengths
    return dpo_loss(*(jnp.asarray(a) for a in logps), chosen_lengths=jnp.asarray(lc),
                    rejected_lengths=jnp.asarray(lr), **kwargs)


# ----------------------------------------------------------------------------- oracle tests
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_every_loss_type_matches_oracle(loss_type, beta):
    logps, lc, lr = make_batch(seed=int(beta * 100))
    for eps in eps_values(loss_type):
        loss, metrics = run(logps, (lc, lr), beta=beta, loss_type=loss_type, label_smoothing=eps)
        expected = dpo_oracle(*logps, loss_type=loss_type, beta=beta, eps=eps, lc=lc, lr=lr)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=2e-6)
        assert float(metrics["dpo/loss"]) == float(loss)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("loss_type", [t for t in DPO_LOSS_TYPES if t != "aot"])
def test_divergences_match_oracle(divergence, loss_type):
    logps, lc, lr = make_batch(seed=7)
    alphas = (0.2, 0.5, 0.8) if divergence == "alpha" else (0.5,)
    for alpha in alphas:
        loss, _ = run(logps, (lc, lr), beta=0.5, loss_type=loss_type, divergence=divergence, alpha=alpha)
        expected = dpo_oracle(*logps, loss_type=loss_type, beta=0.5, lc=lc, lr=lr,
                              divergence=divergence, alpha=alpha)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=2e-6)


def test_discopop_tau_matches_oracle():
    logps, lc, lr = make_batch(seed=3, spread=0.3)
    for tau in (0.05, 0.5, 2.0):
        loss, _ = run(logps, (lc, lr), beta=1.0, loss_type="discopop", discopop_tau=tau)
        expected = dpo_oracle(*logps, loss_type="discopop", beta=1.0, tau=tau)
        np.testing.assert_allclose(float(loss), expected, rtol=2e-5, atol=2e-6)


def test_metrics_use_plain_log_ratios():
    logps, lc, lr = make_batch(seed=11)
    pc, pr, rc, rr = (a.astype(np.float64) for a in logps)
    beta = 0.2
    c, r = beta * (pc - rc), beta * (pr - rr)
    for divergence in DIVERGENCES:
        _, metrics = run(logps, (lc, lr), beta=beta, loss_type="ipo", divergence=divergence)
        expected = {
            "dpo/rewards_chosen": c.mean(),
            "dpo/rewards_rejected": r.mean(),
            "dpo/accuracy": (c > r).mean(),
            "dpo/margin": (c - r).mean(),
            "dpo/logps_chosen": pc.mean(),
            "dpo/logps_rejected": pr.mean(),
        }
        assert set(metrics) == set(expected) | {"dpo/loss"}
        for key, value in expected.items():
            np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- properties
def test_cdpo_and_robust_with_zero_smoothing_equal_dpo():
    logps, lc, lr = make_batch(seed=5)
    dpo, _ = run(logps, (lc, lr), beta=0.1)
    cdpo, _ = run(logps, (lc, lr), beta=0.1, loss_type="sigmoid", label_smoothing=0.0)
    robust, _ = run(logps, (lc, lr), beta=0.1, loss_type="robust", label_smoothing=0.0)
    np.testing.assert_allclose(float(cdpo), float(dpo), rtol=1e-6)
    np.testing.assert_allclose(float(robust), float(dpo), rtol=1e-6)
    smoothed_loss, _ = run(logps, (lc, lr), beta=0.1, loss_type="sigmoid", label_smoothing=0.2)
    assert abs(float(smoothed_loss) - float(dpo)) > 1e-4


def test_exo_pair_defaults_label_smoothing():
    logps, lc, lr = make_batch(seed=9)
    default, _ = run(logps, (lc, lr), loss_type="exo_pair")
    explicit, _ = run(logps, (lc, lr), loss_type="exo_pair", label_smoothing=1e-3)
    np.testing.assert_allclose(float(default), float(explicit), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    margin=st.floats(-30.0, 30.0),
    eps=st.floats(0.0, 0.45),
    beta=st.floats(0.01, 3.0),
)
def test_robust_loss_is_unbiased_under_label_noise(margin, eps, beta):
    """Robust DPO: (1-eps)*L(y) + eps*L(flipped y) equals the clean DPO loss."""
    c = jnp.array([margin / 2], jnp.float32)
    zero = jnp.zeros(1, jnp.float32)
    loss, _ = dpo_loss(c, -c, zero, zero, beta=beta, loss_type="robust", label_smoothing=eps)
    flipped, _ = dpo_loss(-c, c, zero, zero, beta=beta, loss_type="robust", label_smoothing=eps)
    clean, _ = dpo_loss(c, -c, zero, zero, beta=beta)
    mixed = (1 - eps) * float(loss) + eps * float(flipped)
    np.testing.assert_allclose(mixed, float(clean), rtol=1e-4, atol=1e-4)


def grad_wrt_chosen(logps, lengths, **kwargs):
    def loss_fn(policy_chosen):
        return run((policy_chosen,) + tuple(logps[1:]), lengths, **kwargs)[0]

    return np.asarray(jax.grad(loss_fn)(jnp.asarray(logps[0])))


def test_raising_chosen_logp_lowers_sigmoid_loss():
    logps, lc, lr = make_batch(seed=13)
    grad = grad_wrt_chosen(logps, (lc, lr), loss_type="sigmoid", beta=0.1)
    assert np.all(grad < 0)


def test_hinge_gradient_negative_inside_margin_zero_outside():
    logps, lc, lr = make_batch(seed=17, spread=10.0)
    beta = 0.1
    pc, pr, rc, rr = (a.astype(np.float64) for a in logps)
    inside = beta * ((pc - rc) - (pr - rr)) < 1.0
    assert inside.any() and (~inside).any()
    grad = grad_wrt_chosen(logps, (lc, lr), loss_type="hinge", beta=beta)
    assert np.all(grad[inside] < 0)
    assert np.all(grad[~inside] == 0)


def test_ipo_gradient_negative_below_target_margin():
    logps, lc, lr = make_batch(seed=19)
    beta = 0.1  # target per-token margin 1/(2*beta) = 5 exceeds every random margin
    pc, pr, rc, rr = (a.astype(np.float64) for a in logps)
    per_token_margin = (pc - rc) / lc - (pr - rr) / lr
    assert np.all(per_token_margin < 1 / (2 * beta))
    grad = grad_wrt_chosen(logps, (lc, lr), loss_type="ipo", beta=beta)
    assert np.all(grad < 0)
    expected = 2 * (per_token_margin - 1 / (2 * beta)) / lc / BATCH
    np.testing.assert_allclose(grad, expected, rtol=1e-4)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_inputs_give_finite_losses_and_gradients(divergence):
    rng = np.random.default_rng(0)
    policy_chosen = jnp.asarray(rng.choice([-1e3, 1e3], BATCH) + rng.uniform(-1, 1, BATCH), jnp.float32)
    policy_rejected = jnp.asarray(rng.choice([-1e3, 1e3], BATCH), jnp.float32)
    zero = jnp.zeros(BATCH, jnp.float32)
    lengths = jnp.ones(BATCH, jnp.int32)
    for loss_type in DPO_LOSS_TYPES:
        if loss_type == "aot" and divergence != "reverse_kl":
            continue

        def loss_fn(pc, pr):
            return dpo_loss(pc, pr, zero, zero, beta=0.5, loss_type=loss_type, divergence=divergence,
                            chosen_lengths=lengths, rejected_lengths=lengths)[0]

        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(policy_chosen, policy_rejected)
        assert np.isfinite(float(loss)), (loss_type, divergence)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), (loss_type, divergence)


def test_aot_sorts_across_the_batch():
    logps, lc, lr = make_batch(seed=23)
    perm = np.random.default_rng(1).permutation(BATCH)
    rejected_perm = np.random.default_rng(2).permutation(BATCH)
    base = {t: float(run(logps, (lc, lr), loss_type=t)[0]) for t in ("sigmoid", "aot", "aot_unpaired")}
    # Permuting whole pairs changes nothing (the loss is a batch mean).
    permuted = tuple(a[perm] for a in logps)
    for loss_type, value in base.items():
        np.testing.assert_allclose(float(run(permuted, (lc, lr), loss_type=loss_type)[0]), value, rtol=1e-6)
    # Re-pairing the rejected responses leaves aot_unpaired unchanged (it sorts c and r
    # separately) but changes the paired losses.
    repaired = (logps[0], logps[1][rejected_perm], logps[2], logps[3][rejected_perm])
    np.testing.assert_allclose(float(run(repaired, (lc, lr), loss_type="aot_unpaired")[0]),
                               base["aot_unpaired"], rtol=1e-6)
    assert abs(float(run(repaired, (lc, lr), loss_type="sigmoid")[0]) - base["sigmoid"]) > 1e-4
    # aot differs from DPO in general, and equals it when policy and reference margins have
    # the same order across the batch (sorting then keeps the pairing).
    rng = np.random.default_rng(3)
    shuffled_ref = (logps[0], logps[1], logps[0] + rng.normal(0, 20, BATCH).astype(np.float32),
                    logps[1] + rng.normal(0, 20, BATCH).astype(np.float32))
    aot = float(run(shuffled_ref, (lc, lr), loss_type="aot")[0])
    assert abs(aot - float(run(shuffled_ref, (lc, lr), loss_type="sigmoid")[0])) > 1e-3
    pc, pr = logps[0], logps[1]
    same_order = (pc, pr, 0.5 * pc, 0.5 * pr)
    np.testing.assert_allclose(float(run(same_order, (lc, lr), loss_type="aot")[0]),
                               float(run(same_order, (lc, lr), loss_type="sigmoid")[0]), rtol=1e-6)


def test_alpha_divergence_limits():
    logps, lc, lr = make_batch(seed=29, spread=0.5)
    reverse, _ = run(logps, (lc, lr), divergence="reverse_kl")
    forward, _ = run(logps, (lc, lr), divergence="forward_kl")
    near_one, _ = run(logps, (lc, lr), divergence="alpha", alpha=0.9999)
    near_zero, _ = run(logps, (lc, lr), divergence="alpha", alpha=1e-5)
    np.testing.assert_allclose(float(near_one), float(reverse), rtol=1e-3)
    np.testing.assert_allclose(float(near_zero), float(forward), rtol=1e-3)


def test_jit_matches_eager_for_every_loss_type():
    logps, lc, lr = make_batch(seed=31)
    args = tuple(jnp.asarray(a) for a in logps)
    jitted = jax.jit(dpo_loss, static_argnames=("loss_type", "divergence"))
    for loss_type in DPO_LOSS_TYPES:
        eps = 0.1 if loss_type in SMOOTHED else 0.0
        kwargs = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, chosen_lengths=jnp.asarray(lc),
                      rejected_lengths=jnp.asarray(lr))
        eager_loss, eager_metrics = dpo_loss(*args, **kwargs)
        jit_loss, jit_metrics = jitted(*args, **kwargs)
        np.testing.assert_allclose(float(jit_loss), float(eager_loss), rtol=1e-5, atol=1e-6)
        for key in eager_metrics:
            np.testing.assert_allclose(float(jit_metrics[key]), float(eager_metrics[key]), rtol=1e-5, atol=1e-6)


def test_traced_beta_vmap_and_low_precision_inputs():
    logps, lc, lr = make_batch(seed=37)
    args = tuple(jnp.asarray(a) for a in logps)
    eager, _ = dpo_loss(*args, beta=0.25)
    traced, _ = jax.jit(lambda beta: dpo_loss(*args, beta=beta))(jnp.float32(0.25))
    np.testing.assert_allclose(float(traced), float(eager), rtol=1e-6)
    stacked = tuple(jnp.stack([a, a[::-1]]) for a in args)
    losses, metrics = jax.vmap(lambda *xs: dpo_loss(*xs, beta=0.25))(*stacked)
    assert losses.shape == (2,) and metrics["dpo/accuracy"].shape == (2,)
    np.testing.assert_allclose(np.asarray(losses), float(eager), rtol=1e-6)
    low, _ = dpo_loss(*(a.astype(jnp.bfloat16) for a in args), beta=0.25)
    assert low.dtype == jnp.float32


# ----------------------------------------------------------------------------- validation
def test_invalid_options_and_shapes_raise():
    logps, lc, lr = make_batch(seed=41)
    args = tuple(jnp.asarray(a) for a in logps)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, loss_type="dpo")
    with pytest.raises(ValueError, match="divergence"):
        dpo_loss(*args, divergence="kl")
    for loss_type in NEEDS_LENGTHS:
        with pytest.raises(ValueError, match="chosen_lengths"):
            dpo_loss(*args, loss_type=loss_type, rejected_lengths=jnp.asarray(lr))
        with pytest.raises(ValueError, match="rejected_lengths"):
            dpo_loss(*args, loss_type=loss_type, chosen_lengths=jnp.asarray(lc))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(*args, loss_type="ipo", chosen_lengths=jnp.asarray(lc[:3]), rejected_lengths=jnp.asarray(lr))
    with pytest.raises(ValueError, match="policy_chosen_logps"):
        dpo_loss(args[0][:, None], *args[1:])
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(*args[:3], args[3][:4])
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(args[0], args[1], jnp.zeros(BATCH, jnp.int32), args[3])
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="sigmoid", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*args, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="alpha"):
        dpo_loss(*args, divergence="alpha", alpha=1.0)
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(*args, loss_type="aot", divergence="js")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*args, beta=0.0)
    with pytest.raises(ValueError, match="discopop_tau"):
        dpo_loss(*args, loss_type="discopop", discopop_tau=-1.0)


def test_an_empty_batch_raises_instead_of_returning_nan():
    empty = jnp.zeros(0, jnp.float32)
    with pytest.raises(ValueError, match=r"`policy_chosen_logps` is empty \(shape \(0,\)\)"):
        dpo_loss(empty, empty, empty, empty)
    with pytest.raises(ValueError, match="is empty"):  # a static shape: also under jit
        jax.jit(lambda a: dpo_loss(a, a, a, a))(empty)
