"""dpo_step: every preference loss against independently computed log-probs, training,
precomputed reference log-probs, the response-only logits path, optax.MultiSteps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.preference import DPO_LOSS_TYPES, dpo_loss
from rlhf_jax.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from rlhf_jax.training.dpo_step import (
    PreferenceLossConfig,
    dpo_step,
    precompute_reference_logps,
    preference_loss,
)
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from step_problems import (BATCH as ROWS, OPTIMIZER_CONFIG, POLICY, POLICY_PARAMS, REFERENCE_PARAMS,
                           assert_trees_close, fresh_state, jitted_step, kto_batch, log_sigmoid,
                           preference_batch, sequence_logps_oracle, sft_batch)

STEP = jitted_step(dpo_step, "config", "response_window", "num_microbatches")
BATCH = preference_batch(seed=11)
SIGMOID = PreferenceLossConfig(kind="dpo", loss_type="sigmoid", beta=0.5)
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


def oracle_logps(params, batch):
    """(chosen sums, rejected sums, chosen lengths, rejected lengths) in float64."""
    chosen, chosen_lengths = sequence_logps_oracle(
        params, batch.chosen_input_ids, batch.chosen_attention_mask, batch.chosen_loss_mask)
    rejected, rejected_lengths = sequence_logps_oracle(
        params, batch.rejected_input_ids, batch.rejected_attention_mask, batch.rejected_loss_mask)
    return chosen, rejected, chosen_lengths, rejected_lengths


POLICY_LOGPS = oracle_logps(POLICY_PARAMS, BATCH)
REFERENCE_LOGPS = oracle_logps(REFERENCE_PARAMS, BATCH)


def test_sigmoid_step_zero_matches_numpy_and_training_lowers_it():
    chosen, rejected, _, _ = POLICY_LOGPS
    ref_chosen, ref_rejected, _, _ = REFERENCE_LOGPS
    expected = -log_sigmoid(0.5 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    state = fresh_state(POLICY, POLICY_PARAMS)
    losses = []
    for _ in range(20):
        state, metrics = STEP(state, BATCH, config=SIGMOID, ref_params=REFERENCE_PARAMS)
        losses.append(float(metrics["dpo/loss"]))
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.2 * losses[0]
    assert float(metrics["dpo/accuracy"]) == 1.0 and float(metrics["dpo/margin"]) > 0
    assert np.isfinite(float(metrics["optim/grad_norm"]))


# Every loss, step-0 value, one compiled program: (config, response_window) pairs.
CASES = (
    [(PreferenceLossConfig(loss_type=loss_type, beta=0.3,
                           label_smoothing=0.1 if loss_type in SMOOTHED else 0.0), None)
     for loss_type in DPO_LOSS_TYPES]
    + [(PreferenceLossConfig(loss_type="sigmoid", beta=0.3, divergence="js"), None),
       (PreferenceLossConfig(kind="simpo", beta=2.0, gamma=0.5, label_smoothing=0.05), None),
       (PreferenceLossConfig(kind="cpo", beta=0.2, nll_coef=0.5), None),
       (PreferenceLossConfig(kind="orpo", lam=0.2), None)]
)
WINDOW_CASES = [(config, 8) for config, _ in CASES if config.loss_type in ("sigmoid", "ipo")
                and config.kind in ("dpo", "simpo") and config.divergence == "reverse_kl"]


def expected_loss(config):
    chosen, rejected, chosen_lengths, rejected_lengths = (jnp.asarray(x, jnp.float32) for x in POLICY_LOGPS)
    ref_chosen, ref_rejected = (jnp.asarray(x, jnp.float32) for x in REFERENCE_LOGPS[:2])
    if config.kind == "dpo":
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_type,
                        label_smoothing=config.label_smoothing, chosen_lengths=chosen_lengths,
                        rejected_lengths=rejected_lengths, divergence=config.divergence)[0]
    chosen_mean, rejected_mean = chosen / chosen_lengths, rejected / rejected_lengths
    if config.kind == "simpo":
        return simpo_loss(chosen_mean, rejected_mean, beta=config.beta, gamma=config.gamma,
                          label_smoothing=config.label_smoothing)[0]
    if config.kind == "cpo":
        return cpo_loss(chosen, rejected, -chosen_mean, beta=config.beta, nll_coef=config.nll_coef)[0]
    return orpo_loss(chosen_mean, rejected_mean, -chosen_mean, lam=config.lam)[0]


@jax.jit
def all_losses(params, batch):
    return [preference_loss(POLICY.apply, params, batch, config=config, response_window=window)[0]
            for config, window in CASES + WINDOW_CASES]


def test_every_loss_matches_the_loss_function_on_independent_logps():
    batch = BATCH.replace(ref_chosen_logps=REFERENCE_LOGPS[0].astype(np.float32),
                          ref_rejected_logps=REFERENCE_LOGPS[1].astype(np.float32))
    losses = all_losses(POLICY_PARAMS, batch)
    assert len(losses) == len(CASES) + len(WINDOW_CASES) and len(WINDOW_CASES) == 3
    for (config, window), loss in zip(CASES + WINDOW_CASES, losses):
        np.testing.assert_allclose(float(loss), float(expected_loss(config)), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{config.kind}/{config.loss_type} window={window}")


def test_precomputed_reference_gives_the_same_step():
    (filled,) = precompute_reference_logps(POLICY.apply, REFERENCE_PARAMS, [BATCH])
    np.testing.assert_allclose(filled.ref_chosen_logps, REFERENCE_LOGPS[0], rtol=1e-5)
    np.testing.assert_allclose(filled.ref_rejected_logps, REFERENCE_LOGPS[1], rtol=1e-5)
    in_step, in_step_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=SIGMOID,
                                    ref_params=REFERENCE_PARAMS)
    stored, stored_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), filled, config=SIGMOID)
    assert_trees_close(stored.params, in_step.params, atol=1e-6)
    for name, value in in_step_metrics.items():
        np.testing.assert_allclose(float(stored_metrics[name]), float(value), rtol=1e-5, atol=1e-7)


def test_kto_step_with_response_window_matches_numpy_and_lowers_its_loss():
    batch = kto_batch(seed=12)
    config = PreferenceLossConfig(kind="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    logps, _ = sequence_logps_oracle(POLICY_PARAMS, batch.input_ids, batch.attention_mask, batch.loss_mask)
    ref, _ = sequence_logps_oracle(REFERENCE_PARAMS, batch.input_ids, batch.attention_mask, batch.loss_mask)
    kl, _ = sequence_logps_oracle(POLICY_PARAMS, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask)
    kl_ref, _ = sequence_logps_oracle(REFERENCE_PARAMS, batch.kl_input_ids, batch.kl_attention_mask,
                                      batch.kl_loss_mask)
    z0 = max((kl - kl_ref).mean(), 0.0)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    desirable = 1.0 * (1 - sigmoid(0.5 * (logps - ref - z0)))
    undesirable = 1.5 * (1 - sigmoid(0.5 * (z0 - (logps - ref))))
    expected = np.where(batch.is_desirable, desirable, undesirable).mean()
    state = fresh_state(POLICY, POLICY_PARAMS)
    losses = []
    for _ in range(15):
        state, metrics = STEP(state, batch, config=config, ref_params=REFERENCE_PARAMS, response_window=8)
        losses.append(float(metrics["kto/loss"]))
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert float(metrics["train/tokens_outside_window"]) == 0.0


def test_multisteps_over_four_microbatches_equals_one_big_batch():
    accumulating = make_optimizer(OptimizerConfig(**{**OPTIMIZER_CONFIG.__dict__, "grad_accum_steps": 4}))
    big, _ = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=SIGMOID, ref_params=REFERENCE_PARAMS)
    state = fresh_state(POLICY, POLICY_PARAMS, accumulating)
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        microbatch = jax.tree.map(lambda x: x[rows], BATCH)
        state, _ = STEP(state, microbatch, config=SIGMOID, ref_params=REFERENCE_PARAMS)
    assert int(state.step) == 4
    assert_trees_close(state.params, big.params, atol=1e-5)


def test_bad_inputs_raise():
    state = fresh_state(POLICY, POLICY_PARAMS)
    with pytest.raises(ValueError, match="ref_params"):
        dpo_step(state, BATCH, config=SIGMOID)
    with pytest.raises(ValueError, match="KTOBatch"):
        dpo_step(state, BATCH, config=PreferenceLossConfig(kind="kto"), ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="PreferenceBatch"):
        dpo_step(state, sft_batch(), config=SIGMOID, ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="loss_mask"):
        dpo_step(state, BATCH.replace(rejected_loss_mask=None), config=SIGMOID, ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_step(state, BATCH.replace(ref_chosen_logps=np.zeros(ROWS, np.float32)), config=SIGMOID)
    with pytest.raises(ValueError, match="config"):
        dpo_step(state, BATCH, config={"kind": "dpo"}, ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="kind"):
        PreferenceLossConfig(kind="ppo")
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceLossConfig(loss_type="squared")
    with pytest.raises(ValueError, match="beta"):
        PreferenceLossConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceLossConfig(kind="orpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceLossConfig(loss_type="hinge", label_smoothing=0.1)
