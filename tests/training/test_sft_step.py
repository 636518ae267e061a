"""sft_step: response-only cross-entropy against a NumPy oracle, training, microbatching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.training.batches import PreferenceBatch, SFTBatch
from rlhf_jax.training.policy_logps import response_logits
from rlhf_jax.training.sft_step import sft_step
from step_problems import (POLICY, POLICY_PARAMS, assert_trees_close, fresh_state, full_logits, jitted_step,
                           log_softmax, sft_batch, sequences)

STEP = jitted_step(sft_step, "label_smoothing", "response_window", "num_microbatches")
BATCH = sft_batch(seed=3)


def sft_oracle(params, batch, label_smoothing=0.0):
    """Token-mean smoothed cross-entropy over the response tokens of the whole batch."""
    log_probs = log_softmax(full_logits(params, batch.input_ids, batch.attention_mask))[:, :-1]
    labels = np.asarray(batch.input_ids)[:, 1:]
    mask = np.asarray(batch.loss_mask, np.float64)[:, 1:]
    nll = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    smoothed = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    return (smoothed * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum(), mask.sum()


def test_step_zero_loss_matches_numpy_and_training_lowers_it():
    state = fresh_state(POLICY, POLICY_PARAMS)
    expected_loss, expected_nll, tokens = sft_oracle(POLICY_PARAMS, BATCH)
    losses = []
    for _ in range(20):
        state, metrics = STEP(state, BATCH)
        losses.append(float(metrics["sft/loss"]))
    np.testing.assert_allclose(losses[0], expected_loss, rtol=1e-5)
    assert int(state.step) == 20
    assert float(metrics["sft/tokens"]) == tokens
    assert losses[-1] < 0.5 * losses[0]
    assert np.isfinite(float(metrics["optim/grad_norm"]))
    np.testing.assert_allclose(float(metrics["sft/perplexity"]), np.exp(float(metrics["sft/nll"])), rtol=1e-6)


def test_response_window_with_label_smoothing_matches_numpy():
    state = fresh_state(POLICY, POLICY_PARAMS)
    expected_loss, expected_nll, _ = sft_oracle(POLICY_PARAMS, BATCH, label_smoothing=0.1)
    _, metrics = STEP(state, BATCH, label_smoothing=0.1, response_window=8)
    np.testing.assert_allclose(float(metrics["sft/loss"]), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["sft/nll"]), expected_nll, rtol=1e-5)
    assert float(metrics["train/tokens_outside_window"]) == 0.0


def test_microbatches_equal_one_big_batch_with_unequal_token_counts():
    batch = sft_batch(seed=4)
    counts = np.asarray(batch.loss_mask)[:, 1:].reshape(2, 4, -1).sum(axis=(0, 2))  # rows k, k+4
    assert len(set(counts.tolist())) > 1  # the microbatches hold different token counts
    big, big_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), batch)
    split, split_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), batch, num_microbatches=4)
    assert_trees_close(split.params, big.params, atol=1e-5)
    for name in ("sft/loss", "sft/nll", "sft/accuracy", "sft/tokens"):
        np.testing.assert_allclose(float(split_metrics[name]), float(big_metrics[name]), rtol=1e-5)


def test_response_logits_window_positions_and_overflow():
    """The window starts one before the first response token; tokens past it are counted."""
    input_ids, attention_mask, loss_mask = sequences(5, max_response=8)
    forward = jax.jit(response_logits, static_argnums=0, static_argnames="response_window")
    full = forward(POLICY.apply, POLICY_PARAMS, input_ids, attention_mask, loss_mask)
    window = forward(POLICY.apply, POLICY_PARAMS, input_ids, attention_mask, loss_mask, response_window=3)
    first = np.argmax(loss_mask[:, 1:] != 0, axis=1)
    for row in range(len(first)):
        count = int(loss_mask[row, 1:].sum())
        kept = min(count, 3)
        np.testing.assert_allclose(window.logits[row, :kept], full.logits[row, first[row]:first[row] + kept],
                                   atol=1e-5)
        np.testing.assert_array_equal(window.labels[row, :kept], input_ids[row, first[row] + 1:first[row] + 1 + kept])
        assert float(window.mask[row].sum()) == kept
        assert float(window.outside_window[row]) == count - kept
    assert float(full.outside_window.sum()) == 0.0


def test_batches_from_pipeline_arrays():
    input_ids, attention_mask, loss_mask = sequences(6)
    arrays = dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                  row_index=np.arange(len(input_ids)), example_mask=np.ones(len(input_ids)))
    batch = SFTBatch.from_arrays(arrays)
    np.testing.assert_array_equal(batch.loss_mask, loss_mask)
    pairs = PreferenceBatch.from_arrays({f"{side}_{name}": value for side in ("chosen", "rejected")
                                         for name, value in arrays.items()})
    assert pairs.margin is None and pairs.ref_chosen_logps is None
    np.testing.assert_array_equal(pairs.rejected_loss_mask, loss_mask)
    with pytest.raises(ValueError, match="loss_mask"):
        SFTBatch.from_arrays({"input_ids": input_ids, "attention_mask": attention_mask})


def test_bad_inputs_raise():
    state = fresh_state(POLICY, POLICY_PARAMS)
    with pytest.raises(ValueError, match="SFTBatch"):
        sft_step(state, PreferenceBatch(BATCH.input_ids, BATCH.attention_mask, BATCH.input_ids,
                                        BATCH.attention_mask))
    with pytest.raises(ValueError, match="loss_mask"):
        sft_step(state, SFTBatch(BATCH.input_ids, BATCH.attention_mask, BATCH.loss_mask[:, :-1]))
    with pytest.raises(ValueError, match="input_ids"):
        sft_step(state, SFTBatch(BATCH.input_ids.astype(np.float32), BATCH.attention_mask, BATCH.loss_mask))
    with pytest.raises(ValueError, match="response_window"):
        response_logits(POLICY.apply, POLICY_PARAMS, jnp.asarray(BATCH.input_ids), BATCH.attention_mask,
                        BATCH.loss_mask, response_window=0)
    with pytest.raises(ValueError, match="microbatches"):
        sft_step(state, BATCH, num_microbatches=3)
