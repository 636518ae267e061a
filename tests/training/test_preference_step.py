"""preference_step: every preference loss against independently computed log-probs (plain
forward passes of each prompt + response), training, precomputed reference log-probs, KTO
with mismatched pairs, micro-batch accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.preference import DPO_LOSS_TYPES, dpo_loss
from rlhf_jax.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.preference_step import (
    PreferenceLossConfig,
    pair_logps,
    precompute_reference_logps,
    preference_loss,
    preference_step,
)
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from step_problems import (BATCH as ROWS, OPTIMIZER_CONFIG, POLICY, POLICY_PARAMS, REFERENCE_PARAMS,
                           assert_trees_close, fresh_state, jitted_step, kto_batch, lm_rows, log_sigmoid,
                           preference_batch, response_sequences, sequence_logps_oracle, sft_batch)

STEP = jitted_step(preference_step, "config", "num_microbatches")
BATCH = preference_batch(seed=11)
SIGMOID = PreferenceLossConfig(kind="dpo", loss_type="sigmoid", beta=0.5)
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")


def oracle_logps(params, batch):
    """(chosen sums, rejected sums, chosen lengths, rejected lengths) in float64."""
    chosen, chosen_lengths = sequence_logps_oracle(params, *response_sequences(batch, 0))
    rejected, rejected_lengths = sequence_logps_oracle(params, *response_sequences(batch, 1))
    return chosen, rejected, chosen_lengths, rejected_lengths


POLICY_LOGPS = oracle_logps(POLICY_PARAMS, BATCH)
REFERENCE_LOGPS = oracle_logps(REFERENCE_PARAMS, BATCH)


def train_losses(batch, config, steps: int, loss_key: str):
    """`steps` preference steps from the policy's initial parameters: (losses, last metrics)."""
    state, losses = fresh_state(POLICY, POLICY_PARAMS), []
    for _ in range(steps):
        state, metrics = STEP(state, batch, config=config, ref_params=REFERENCE_PARAMS)
        losses.append(float(metrics[loss_key]))
    return losses, metrics


def test_sigmoid_step_zero_matches_numpy_and_training_lowers_it():
    chosen, rejected, _, _ = POLICY_LOGPS
    ref_chosen, ref_rejected, _, _ = REFERENCE_LOGPS
    expected = -log_sigmoid(0.5 * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    losses, metrics = train_losses(BATCH, SIGMOID, 20, "dpo/loss")
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.2 * losses[0]
    assert float(metrics["dpo/accuracy"]) == 1.0 and float(metrics["dpo/margin"]) > 0
    assert np.isfinite(float(metrics["optim/grad_norm"]))


# Every loss, step-0 value, one compiled program.
CASES = (
    [PreferenceLossConfig(loss_type=loss_type, beta=0.3, label_smoothing=0.1 if loss_type in SMOOTHED else 0.0)
     for loss_type in DPO_LOSS_TYPES]
    + [PreferenceLossConfig(loss_type="sigmoid", beta=0.3, divergence="js"),
       PreferenceLossConfig(kind="simpo", beta=2.0, target_margin=0.5, label_smoothing=0.05),
       PreferenceLossConfig(kind="cpo", beta=0.2, nll_coef=0.5),
       PreferenceLossConfig(kind="orpo", odds_ratio_coef=0.2)]
)


def expected_loss(config):
    chosen, rejected, chosen_lengths, rejected_lengths = (jnp.asarray(x, jnp.float32) for x in POLICY_LOGPS)
    ref_chosen, ref_rejected = (jnp.asarray(x, jnp.float32) for x in REFERENCE_LOGPS[:2])
    if config.kind == "dpo":
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=config.beta, loss_type=config.loss_type,
                        label_smoothing=config.label_smoothing, chosen_lengths=chosen_lengths,
                        rejected_lengths=rejected_lengths, divergence=config.divergence)[0]
    chosen_mean, rejected_mean = chosen / chosen_lengths, rejected / rejected_lengths
    if config.kind == "simpo":
        return simpo_loss(chosen_mean, rejected_mean, beta=config.beta, target_margin=config.target_margin,
                          label_smoothing=config.label_smoothing)[0]
    if config.kind == "cpo":
        return cpo_loss(chosen, rejected, -chosen_mean, beta=config.beta, nll_coef=config.nll_coef)[0]
    return orpo_loss(chosen_mean, rejected_mean, -chosen_mean, odds_ratio_coef=config.odds_ratio_coef)[0]


@jax.jit
def all_losses(params, batch):
    return [preference_loss(POLICY.apply, params, batch, config=config)[0] for config in CASES]


def test_every_loss_matches_the_loss_function_on_independent_logps():
    batch = BATCH.replace(ref_logps=np.stack(REFERENCE_LOGPS[:2], axis=1).astype(np.float32))
    losses = all_losses(POLICY_PARAMS, batch)
    assert len(losses) == len(CASES)
    for config, loss in zip(CASES, losses):
        np.testing.assert_allclose(float(loss), float(expected_loss(config)), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{config.kind}/{config.loss_type}")


def test_pair_logps_match_numpy_oracle_with_one_token_prompts():
    """Each pair's prompt runs once; prompts of 1..6 tokens (one-token prompts included)."""
    prompt_ids, prompt_mask, response_ids, response_mask = lm_rows(31, 6, num=2, max_prompt=6, max_response=10)
    prompt_mask[:2] = 0
    prompt_mask[:2, -1] = 1  # rows 0 and 1: a one-token prompt
    batch = PreferenceBatch(prompt_ids * prompt_mask, prompt_mask, response_ids, response_mask)
    chosen, rejected = jax.jit(pair_logps, static_argnums=0)(POLICY.apply, POLICY_PARAMS, batch)
    for side, got in enumerate((chosen, rejected)):
        expected, lengths = sequence_logps_oracle(POLICY_PARAMS, *response_sequences(batch, side))
        np.testing.assert_allclose(got.logps, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.lengths, lengths)


def test_precomputed_reference_gives_the_same_step():
    (filled,) = precompute_reference_logps(POLICY.apply, REFERENCE_PARAMS, [BATCH])
    np.testing.assert_allclose(filled.ref_logps[:, 0], REFERENCE_LOGPS[0], rtol=1e-5)
    np.testing.assert_allclose(filled.ref_logps[:, 1], REFERENCE_LOGPS[1], rtol=1e-5)
    in_step, in_step_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=SIGMOID,
                                    ref_params=REFERENCE_PARAMS)
    stored, stored_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), filled, config=SIGMOID)
    assert_trees_close(stored.params, in_step.params, atol=1e-6)
    for name, value in in_step_metrics.items():
        np.testing.assert_allclose(float(stored_metrics[name]), float(value), rtol=1e-5, atol=1e-7)


def test_kto_step_with_mismatched_pairs_matches_numpy_and_lowers_its_loss():
    batch = kto_batch(seed=12)
    config = PreferenceLossConfig(kind="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    logps, _ = sequence_logps_oracle(POLICY_PARAMS, *response_sequences(batch, 0))
    ref, _ = sequence_logps_oracle(REFERENCE_PARAMS, *response_sequences(batch, 0))
    kl, _ = sequence_logps_oracle(POLICY_PARAMS, *response_sequences(batch.kl_batch(), 0))
    kl_ref, _ = sequence_logps_oracle(REFERENCE_PARAMS, *response_sequences(batch.kl_batch(), 0))
    z0 = max((kl - kl_ref).mean(), 0.0)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    desirable = 1.0 * (1 - sigmoid(0.5 * (logps - ref - z0)))
    undesirable = 1.5 * (1 - sigmoid(0.5 * (z0 - (logps - ref))))
    expected = np.where(batch.is_desirable, desirable, undesirable).mean()
    losses, _ = train_losses(batch, config, 15, "kto/loss")
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.5 * losses[0]


def test_four_microbatches_equal_one_big_batch():
    big, _ = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=SIGMOID, ref_params=REFERENCE_PARAMS)
    state, _ = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=SIGMOID, ref_params=REFERENCE_PARAMS,
                    num_microbatches=4)
    assert int(state.step) == 1
    assert_trees_close(state.params, big.params, atol=1e-5)


def test_bad_inputs_raise():
    state = fresh_state(POLICY, POLICY_PARAMS)
    with pytest.raises(ValueError, match="ref_params"):
        preference_step(state, BATCH, config=SIGMOID)
    with pytest.raises(ValueError, match="KTOBatch"):
        preference_step(state, BATCH, config=PreferenceLossConfig(kind="kto"), ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="PreferenceBatch"):
        preference_step(state, sft_batch(), config=SIGMOID, ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="response_ids"):
        preference_step(state, BATCH.replace(response_ids=BATCH.response_ids[:, :1],
                                             response_mask=BATCH.response_mask[:, :1]),
                        config=SIGMOID, ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="ref_logps"):
        preference_step(state, BATCH.replace(ref_logps=np.zeros(ROWS, np.float32)), config=SIGMOID)
    kto = kto_batch()
    with pytest.raises(ValueError, match="kl_response_mask"):
        preference_step(state, kto.replace(kl_response_mask=None), config=PreferenceLossConfig(kind="kto"),
                        ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="is_desirable"):
        preference_step(state, kto.replace(is_desirable=None), config=PreferenceLossConfig(kind="kto"),
                        ref_params=REFERENCE_PARAMS)
    with pytest.raises(ValueError, match="config"):
        preference_step(state, BATCH, config={"kind": "dpo"}, ref_params=REFERENCE_PARAMS)
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
