"""reward_step: Bradley-Terry with margin and centering against NumPy (each side scored by
its own plain forward pass of prompt + response), training, errors."""
import jax
import numpy as np
import pytest

from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.logprobs import LMBatch
from rlhf_jax.training.reward_step import response_scores, reward_step
from step_problems import (
    REWARD_MODEL,
    REWARD_PARAMS,
    fresh_state,
    jitted_step,
    lm_rows,
    log_sigmoid,
    preference_batch,
    response_sequences,
    sft_batch,
)

STEP = jitted_step(reward_step, "center_coef", "num_microbatches")
MARGIN = np.linspace(0.0, 0.5, 8).astype(np.float32)
BATCH = preference_batch(seed=7).replace(margin=MARGIN)
CENTER = 0.05


def scores(params, batch, side):
    """Scores of one side from its own forward pass of prompt + response (not the step's
    shared-prompt one)."""
    input_ids, attention_mask, _ = response_sequences(batch, side)
    return np.asarray(REWARD_MODEL.apply({"params": params}, input_ids, attention_mask), np.float64)


def test_step_zero_matches_numpy_and_training_separates_pairs():
    chosen = scores(REWARD_PARAMS, BATCH, 0)
    rejected = scores(REWARD_PARAMS, BATCH, 1)
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
    trained_chosen = scores(state.params, BATCH, 0)
    trained_rejected = scores(state.params, BATCH, 1)
    assert np.all(trained_chosen - trained_rejected > MARGIN)


def test_first_metrics_report_the_untrained_scores():
    chosen = scores(REWARD_PARAMS, BATCH, 0)
    rejected = scores(REWARD_PARAMS, BATCH, 1)
    _, metrics = STEP(fresh_state(REWARD_MODEL, REWARD_PARAMS), BATCH, center_coef=CENTER)
    np.testing.assert_allclose(float(metrics["reward/accuracy"]), np.mean(chosen > rejected))
    np.testing.assert_allclose(float(metrics["reward/margin"]), np.mean(chosen - rejected), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["reward/chosen"]), chosen.mean(), rtol=1e-5, atol=1e-7)


def test_response_scores_read_each_response_end_for_any_number_of_responses():
    batch = LMBatch(*lm_rows(8, num=3))
    got = jax.jit(response_scores, static_argnums=0)(REWARD_MODEL.apply, REWARD_PARAMS, batch)
    assert got.shape == (8, 3)
    for side in range(3):
        np.testing.assert_allclose(got[:, side], scores(REWARD_PARAMS, batch, side), rtol=2e-5, atol=2e-5)


def test_bad_inputs_raise():
    state = fresh_state(REWARD_MODEL, REWARD_PARAMS)
    with pytest.raises(ValueError, match="PreferenceBatch"):
        reward_step(state, sft_batch())
    with pytest.raises(ValueError, match="margin"):
        reward_step(state, BATCH.replace(margin=MARGIN[:3]))
    with pytest.raises(ValueError, match="response_ids"):
        reward_step(state, BATCH.replace(response_ids=BATCH.response_ids[:, :1],
                                         response_mask=BATCH.response_mask[:, :1]))
    with pytest.raises(ValueError, match="rank"):
        reward_step(state, PreferenceBatch(BATCH.prompt_ids[0], BATCH.prompt_mask[0],
                                           BATCH.response_ids[0], BATCH.response_mask[0]))
