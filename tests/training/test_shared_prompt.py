"""Pairs that run their shared prompt once: `CausalLM.shared_prefix_hidden_states`,
`shared_prompt_logps` and `dpo_step(prompt_window=...)` against plain forward passes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.dpo_step import PreferenceLossConfig, dpo_step, pair_logps
from rlhf_jax.training.policy_logps import shared_prompt_logps
from step_problems import (POLICY, POLICY_PARAMS, REFERENCE_PARAMS, VOCAB, assert_trees_close, fresh_state,
                           jitted_step, kto_batch, sequence_logps_oracle)

ROWS, TIME, PROMPT, RESPONSE = 6, 18, 6, 10
STEP = jitted_step(dpo_step, "config", "response_window", "prompt_window", "num_microbatches")


def shared_pairs(seed, *, rows=ROWS, max_prompt=PROMPT, max_response=RESPONSE):
    """Right-padded rows `prompt + chosen` and `prompt + rejected` with the same prompt per
    pair: prompt lengths 1..max_prompt, response lengths 1..max_response, NumPy."""
    rng = np.random.default_rng(seed)
    arrays = {name: np.zeros((rows, TIME), dtype) for name, dtype in (
        ("chosen_input_ids", np.int32), ("chosen_attention_mask", np.int32), ("chosen_loss_mask", np.float32),
        ("rejected_input_ids", np.int32), ("rejected_attention_mask", np.int32), ("rejected_loss_mask", np.float32))}
    for row in range(rows):
        prompt = rng.integers(1, VOCAB, rng.integers(1, max_prompt + 1))
        for side in ("chosen", "rejected"):
            response = rng.integers(1, VOCAB, rng.integers(1, max_response + 1))
            sequence = np.concatenate([prompt, response])
            arrays[f"{side}_input_ids"][row, :len(sequence)] = sequence
            arrays[f"{side}_attention_mask"][row, :len(sequence)] = 1
            arrays[f"{side}_loss_mask"][row, len(prompt):len(sequence)] = 1
    return PreferenceBatch(**arrays)


def triples(batch):
    return ((batch.chosen_input_ids, batch.chosen_attention_mask, batch.chosen_loss_mask),
            (batch.rejected_input_ids, batch.rejected_attention_mask, batch.rejected_loss_mask))


BATCH = shared_pairs(seed=3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefix_hidden_states_equal_full_forward_passes(family):
    config = (ModelConfig.llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=48)
              if family == "llama" else
              ModelConfig.gpt2(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                               max_position_embeddings=32))
    model = CausalLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    batch, prompt_len, num, response_len = 3, 5, 3, 4
    prompt_lengths, response_lengths = np.array([5, 2, 1]), rng.integers(1, response_len + 1, (batch, num))
    prompt_ids = rng.integers(1, VOCAB, (batch, prompt_len))
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
    response_ids = rng.integers(1, VOCAB, (batch, num, response_len))
    response_mask = (np.arange(response_len)[None, None] < response_lengths[..., None]).astype(np.int32)
    last, hidden = model.apply({"params": params}, prompt_ids * prompt_mask, prompt_mask,
                               response_ids * response_mask, response_mask, method="shared_prefix_hidden_states")
    assert last.shape == (batch, 32) and hidden.shape == (batch, num, response_len, 32)
    for b in range(batch):
        prompt = prompt_ids[b, prompt_len - prompt_lengths[b]:]
        for n in range(num):
            response = response_ids[b, n, :response_lengths[b, n]]
            sequence = jnp.asarray(np.concatenate([prompt, response])[None])
            full = model.apply({"params": params}, sequence, method="hidden_states")[0]
            np.testing.assert_allclose(last[b], full[len(prompt) - 1], atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(hidden[b, n, :len(response)], full[len(prompt):], atol=2e-5, rtol=2e-5)


def test_shared_prompt_logps_match_numpy_oracle_and_full_path_gradients():
    chosen, rejected, not_shared = jax.jit(lambda p: shared_prompt_logps(
        POLICY.apply, p, *triples(BATCH), prompt_window=PROMPT, response_window=RESPONSE))(POLICY_PARAMS)
    for got, (ids, mask, counted) in zip((chosen, rejected), triples(BATCH)):
        expected, lengths = sequence_logps_oracle(POLICY_PARAMS, ids, mask, counted)
        np.testing.assert_allclose(got.logps, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.lengths, lengths)
        np.testing.assert_array_equal(got.outside_window, 0.0)
    np.testing.assert_array_equal(not_shared, 0.0)

    def shared_objective(params):
        first, second, _ = shared_prompt_logps(POLICY.apply, params, *triples(BATCH),
                                               prompt_window=PROMPT, response_window=RESPONSE)
        return jnp.sum(first.logps - 0.5 * second.logps)

    def full_objective(params):
        (ids, mask, counted), (ids2, mask2, counted2) = triples(BATCH)
        logps = lambda i, m, c: jnp.sum(jnp.take_along_axis(
            jax.nn.log_softmax(POLICY.apply({"params": params}, i, m)[:, :-1]), i[:, 1:, None], -1)[..., 0]
            * c[:, 1:], axis=1)
        return jnp.sum(logps(ids, mask, counted) - 0.5 * logps(ids2, mask2, counted2))

    assert_trees_close(jax.grad(shared_objective)(POLICY_PARAMS), jax.grad(full_objective)(POLICY_PARAMS),
                       atol=2e-5, rtol=2e-5)


def test_rows_that_break_the_precondition_are_flagged():
    ids, mask, counted = (np.array(x) for x in triples(BATCH)[0])
    other = tuple(np.array(x) for x in triples(BATCH)[1])
    other[0][1, 0] = (other[0][1, 0] % (VOCAB - 1)) + 1  # row 1: prompts differ in their first token
    _, _, not_shared = shared_prompt_logps(POLICY.apply, POLICY_PARAMS, (ids, mask, counted), other,
                                           prompt_window=PROMPT, response_window=RESPONSE)
    np.testing.assert_array_equal(not_shared, np.eye(ROWS)[1])
    prompt_lengths = np.argmax(counted != 0, axis=1)
    short_window = int(prompt_lengths.max()) - 1
    first, _, not_shared = shared_prompt_logps(POLICY.apply, POLICY_PARAMS, triples(BATCH)[0], triples(BATCH)[1],
                                               prompt_window=short_window, response_window=3)
    np.testing.assert_array_equal(not_shared, (prompt_lengths > short_window).astype(np.float32))
    np.testing.assert_allclose(first.outside_window, np.maximum(counted.sum(1) - 3, 0))


def test_dpo_step_with_prompt_window_equals_the_plain_step():
    config = PreferenceLossConfig(loss_type="ipo", beta=0.3)
    plain, plain_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=config,
                                ref_params=REFERENCE_PARAMS, response_window=RESPONSE)
    shared, shared_metrics = STEP(fresh_state(POLICY, POLICY_PARAMS), BATCH, config=config,
                                  ref_params=REFERENCE_PARAMS, response_window=RESPONSE, prompt_window=PROMPT)
    assert float(shared_metrics["train/prompt_not_shared"]) == 0.0
    assert "train/prompt_not_shared" not in plain_metrics
    for key in ("dpo/loss", "dpo/margin", "optim/grad_norm"):
        np.testing.assert_allclose(shared_metrics[key], plain_metrics[key], rtol=2e-5, atol=2e-6)
    assert_trees_close(shared.params, plain.params, atol=2e-5, rtol=2e-5)


def test_prompt_window_errors():
    state = fresh_state(POLICY, POLICY_PARAMS)
    with pytest.raises(ValueError, match="`prompt_window` needs a `response_window`"):
        dpo_step(state, BATCH, config=PreferenceLossConfig(), ref_params=REFERENCE_PARAMS, prompt_window=PROMPT)
    with pytest.raises(ValueError, match="KTO rows are unpaired"):
        dpo_step(state, kto_batch(), config=PreferenceLossConfig(kind="kto"), ref_params=REFERENCE_PARAMS,
                 response_window=RESPONSE, prompt_window=PROMPT)
    with pytest.raises(ValueError, match="`prompt_window` must be a positive static int"):
        shared_prompt_logps(POLICY.apply, POLICY_PARAMS, *triples(BATCH), prompt_window=0, response_window=4)


@pytest.mark.parametrize("prompt_window", [None, PROMPT])
def test_pair_logps_match_numpy_oracle_on_both_paths(prompt_window):
    chosen, rejected, not_shared = pair_logps(POLICY.apply, POLICY_PARAMS, BATCH, response_window=RESPONSE,
                                              prompt_window=prompt_window)
    for got, (ids, mask, counted) in zip((chosen, rejected), triples(BATCH)):
        expected, lengths = sequence_logps_oracle(POLICY_PARAMS, ids, mask, counted)
        np.testing.assert_allclose(got.logps, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.lengths, lengths)
    assert (not_shared is None) == (prompt_window is None)
