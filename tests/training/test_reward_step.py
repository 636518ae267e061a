"""reward_step: Bradley-Terry with margin and centering against NumPy, training, errors."""
import numpy as np
import pytest

from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.reward_step import reward_step
from step_problems import (
    REWARD_MODEL,
    REWARD_PARAMS,
    fresh_state,
    jitted_step,
    log_sigmoid,
    preference_batch,
    sft_batch,
)

STEP = jitted_step(reward_step, "center_coef", "num_microbatches")
MARGIN = np.linspace(0.0, 0.5, 8).astype(np.float32)
BATCH = preference_batch(seed=7).replace(margin=MARGIN)
CENTER = 0.05


def scores(params, input_ids, attention_mask):
    """Scores of each side from its own forward pass (not the step's fused one)."""
    return np.asarray(REWARD_MODEL.apply({"params": params}, input_ids, attention_mask), np.float64)


def test_step_zero_matches_numpy_and_training_separates_pairs():
    chosen = scores(REWARD_PARAMS, BATCH.chosen_input_ids, BATCH.chosen_attention_mask)
    rejected = scores(REWARD_PARAMS, BATCH.rejected_input_ids, BATCH.rejected_attention_mask)
    expected = -log_sigmoid(chosen - rejected - MARGIN).mean() + CENTER * ((chosen + rejected) ** 2).mean()
    state = fresh_state(REWARD_MODEL, REWARD_PARAMS)
    losses = []
    for _ in range(15):
        state, metrics = STEP(state, BATCH, center_coef=CENTER)
        losses.append(float(metrics["reward/loss"]))
    np.testing.assert_allclose(losses[0], expected, rtol=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert float(metrics["reward/accuracy"]) == 1.0
    assert np.isfinite(float(metrics["optim/grad_norm"]))
    trained_chosen = scores(state.params, BATCH.chosen_input_ids, BATCH.chosen_attention_mask)
    trained_rejected = scores(state.params, BATCH.rejected_input_ids, BATCH.rejected_attention_mask)
    assert np.all(trained_chosen - trained_rejected > MARGIN)


def test_first_metrics_report_the_untrained_scores():
    chosen = scores(REWARD_PARAMS, BATCH.chosen_input_ids, BATCH.chosen_attention_mask)
    rejected = scores(REWARD_PARAMS, BATCH.rejected_input_ids, BATCH.rejected_attention_mask)
    _, metrics = STEP(fresh_state(REWARD_MODEL, REWARD_PARAMS), BATCH, center_coef=CENTER)
    np.testing.assert_allclose(float(metrics["reward/accuracy"]), np.mean(chosen > rejected))
    np.testing.assert_allclose(float(metrics["reward/margin"]), np.mean(chosen - rejected), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["reward/chosen"]), chosen.mean(), rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise():
    state = fresh_state(REWARD_MODEL, REWARD_PARAMS)
    with pytest.raises(ValueError, match="PreferenceBatch"):
        reward_step(state, sft_batch())
    with pytest.raises(ValueError, match="margin"):
        reward_step(state, BATCH.replace(margin=MARGIN[:3]))
    with pytest.raises(ValueError, match="rejected_input_ids"):
        reward_step(state, BATCH.replace(rejected_input_ids=BATCH.rejected_input_ids[:, :-1],
                                         rejected_attention_mask=BATCH.rejected_attention_mask[:, :-1],
                                         rejected_loss_mask=None))
    with pytest.raises(ValueError, match="rank"):
        reward_step(state, PreferenceBatch(BATCH.chosen_input_ids[0], BATCH.chosen_attention_mask[0],
                                           BATCH.rejected_input_ids[0], BATCH.rejected_attention_mask[0]))
