"""sft_step: response-only cross-entropy against a NumPy oracle, training, microbatching."""
import numpy as np
import pytest

from rlhf_jax.training.batches import PreferenceBatch, SFTBatch
from rlhf_jax.training.sft_step import sft_step
from step_problems import (POLICY, POLICY_PARAMS, assert_trees_close, fresh_state, full_logits, jitted_step,
                           lm_rows, log_softmax, response_sequences, sft_batch)

STEP = jitted_step(sft_step, "label_smoothing", "num_microbatches")
BATCH = sft_batch(seed=3)


def sft_oracle(params, batch, label_smoothing=0.0):
    """Token-mean smoothed cross-entropy over the trained response tokens of the whole batch,
    from plain forward passes of the joined prompt + response sequences."""
    input_ids, attention_mask, loss_mask = response_sequences(batch, 0)
    if batch.loss_mask is not None:
        prompt_width = np.shape(batch.prompt_ids)[1]
        loss_mask[:, prompt_width:] *= np.asarray(batch.loss_mask)[:, 0]
    logits = full_logits(params, input_ids, attention_mask)
    log_probs = log_softmax(logits)[:, :-1]
    labels = input_ids[:, 1:]
    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    nll = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    smoothed = (1 - label_smoothing) * nll - label_smoothing * log_probs.mean(axis=-1)
    accuracy = (logits[:, :-1].argmax(-1) == labels)
    return ((smoothed * mask).sum() / mask.sum(), (nll * mask).sum() / mask.sum(), mask.sum(),
            (accuracy * mask).sum() / mask.sum())


def test_step_zero_loss_matches_numpy_and_training_lowers_it():
    state = fresh_state(POLICY, POLICY_PARAMS)
    expected_loss, expected_nll, tokens, expected_accuracy = sft_oracle(POLICY_PARAMS, BATCH)
    losses = []
    for step in range(20):
        state, metrics = STEP(state, BATCH)
        losses.append(float(metrics["sft/loss"]))
        if step == 0:
            np.testing.assert_allclose(float(metrics["sft/accuracy"]), expected_accuracy, rtol=1e-6)
    np.testing.assert_allclose(losses[0], expected_loss, rtol=1e-5)
    assert int(state.step) == 20
    assert float(metrics["sft/tokens"]) == tokens
    assert losses[-1] < 0.5 * losses[0]
    assert np.isfinite(float(metrics["optim/grad_norm"]))
    np.testing.assert_allclose(float(metrics["sft/perplexity"]), np.exp(float(metrics["sft/nll"])), rtol=1e-6)


def test_label_smoothing_and_a_partial_loss_mask_match_numpy():
    """A conversation's untrained turns (loss_mask 0 inside the response) are context only."""
    rng = np.random.default_rng(0)
    batch = BATCH.replace(loss_mask=(rng.random(np.shape(BATCH.response_ids)) < 0.6).astype(np.float32))
    for label_smoothing in (0.0, 0.1):
        expected_loss, expected_nll, tokens, _ = sft_oracle(POLICY_PARAMS, batch, label_smoothing)
        _, metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), batch, label_smoothing=label_smoothing)
        np.testing.assert_allclose(float(metrics["sft/loss"]), expected_loss, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["sft/nll"]), expected_nll, rtol=1e-5)
        assert float(metrics["sft/tokens"]) == tokens < np.sum(batch.response_mask)


def test_microbatches_equal_one_big_batch_with_unequal_token_counts():
    batch = sft_batch(seed=4)
    counts = np.asarray(batch.response_mask)[:, 0].reshape(2, 4, -1).sum(axis=(0, 2))  # rows k, k+4
    assert len(set(counts.tolist())) > 1  # the microbatches hold different token counts
    big, big_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), batch)
    split, split_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), batch, num_microbatches=4)
    assert_trees_close(split.params, big.params, atol=1e-5)
    for name in ("sft/loss", "sft/nll", "sft/accuracy", "sft/tokens"):
        np.testing.assert_allclose(float(split_metrics[name]), float(big_metrics[name]), rtol=1e-5)


def test_batches_from_pipeline_arrays():
    prompt_ids, prompt_mask, response_ids, response_mask = lm_rows(6, num=2)
    arrays = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids[:, :1],
                  response_mask=response_mask[:, :1], loss_mask=response_mask[:, :1].astype(np.float32),
                  row_index=np.arange(len(prompt_ids)), example_mask=np.ones(len(prompt_ids)))
    batch = SFTBatch.from_arrays(arrays)
    np.testing.assert_array_equal(batch.loss_mask, arrays["loss_mask"])
    assert SFTBatch.from_arrays({**arrays, "loss_mask": None}).loss_mask is None
    pairs = PreferenceBatch.from_arrays({**arrays, "response_ids": response_ids, "response_mask": response_mask})
    assert pairs.margin is None and pairs.ref_logps is None
    np.testing.assert_array_equal(pairs.response_mask, response_mask)
    with pytest.raises(ValueError, match="response_mask"):
        SFTBatch.from_arrays({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids})


def test_bad_inputs_raise():
    state = fresh_state(POLICY, POLICY_PARAMS)
    with pytest.raises(ValueError, match="SFTBatch"):
        sft_step(state, PreferenceBatch(BATCH.prompt_ids, BATCH.prompt_mask, BATCH.response_ids,
                                        BATCH.response_mask))
    with pytest.raises(ValueError, match="loss_mask"):
        sft_step(state, BATCH.replace(loss_mask=np.ones(np.shape(BATCH.response_ids))[..., :-1]))
    with pytest.raises(ValueError, match="response_ids"):
        sft_step(state, SFTBatch(*lm_rows(0, num=2)))
    with pytest.raises(ValueError, match="prompt_ids"):
        sft_step(state, BATCH.replace(prompt_ids=BATCH.prompt_ids.astype(np.float32)))
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_step(state, BATCH, label_smoothing=1.0)
    with pytest.raises(ValueError, match="microbatches"):
        sft_step(state, BATCH, num_microbatches=3)
