"""`LMBatch` and `response_logprobs`: the one log-prob path, against plain forward passes of
each prompt + response scored by a NumPy log-softmax, for both prompt paths and N = 1, 2, 4."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import ValueModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.training.logprobs import LMBatch, response_hidden_states, response_logprobs, response_states_at

VOCAB = 48
CONFIGS = {
    "llama": ModelConfig.llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=48),
    "gpt2": ModelConfig.gpt2(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                             max_position_embeddings=32),
}


@functools.partial(jax.jit, static_argnums=0, static_argnames="method")
def forward(model, params, ids, method="__call__"):
    """One plain forward pass (compiled once per model, method and length, so the oracles below
    do not pay an eager dispatch of every op for every new sequence length)."""
    return model.apply({"params": params}, ids, method=method)


def random_batch(seed, rows=3, prompt=5, num=2, response=4):
    """Left-padded prompts of 1..prompt tokens, right-padded responses of 0..response tokens."""
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, prompt + 1, rows)
    response_lengths = rng.integers(0, response + 1, (rows, num))
    response_lengths[0, 0] = response  # at least one full response
    return LMBatch(
        prompt_ids=rng.integers(1, VOCAB, (rows, prompt)).astype(np.int32),
        prompt_mask=(np.arange(prompt)[None] >= prompt - prompt_lengths[:, None]).astype(np.int32),
        response_ids=rng.integers(1, VOCAB, (rows, num, response)).astype(np.int32),
        response_mask=(np.arange(response)[None, None] < response_lengths[..., None]).astype(np.int32),
    )


def oracle_logprobs(model, params, batch, temperature):
    """Each prompt + response alone (padding removed) through the model; NumPy log-softmax."""
    rows, num, length = batch.response_ids.shape
    out = np.zeros((rows, num, length))
    for b in range(rows):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b] != 0]
        for n in range(num):
            count = int(batch.response_mask[b, n].sum())
            sequence = np.concatenate([prompt, batch.response_ids[b, n, :count]])[None]
            logits = np.asarray(forward(model, params, sequence), np.float64)[0] / temperature
            logits = logits - logits.max(-1, keepdims=True)
            log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            for j in range(count):
                out[b, n, j] = log_softmax[len(prompt) - 1 + j, batch.response_ids[b, n, j]]
    return out


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("num", [1, 2, 4])
def test_response_logprobs_match_separate_forward_passes(family, num):
    model = CausalLM(CONFIGS[family])
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=num, num=num)
    expected = oracle_logprobs(model, params, batch, temperature=0.7)
    for prompt_once in (True, False):
        result = jax.jit(response_logprobs, static_argnums=0,
                         static_argnames=("prompt_once", "with_entropy"))(
            model.apply, params, batch, temperature=0.7, with_entropy=True, prompt_once=prompt_once)
        chex.assert_shape([result.logprobs, result.entropy, result.mask], batch.response_ids.shape)
        np.testing.assert_allclose(np.asarray(result.logprobs), expected, atol=2e-5)
        assert np.all(np.asarray(result.entropy)[batch.response_mask == 0] == 0)
        assert np.all(np.asarray(result.entropy)[batch.response_mask != 0] > 0)
        np.testing.assert_allclose(result.sequence_sum(), expected.sum(-1), atol=1e-4)
        np.testing.assert_array_equal(result.lengths(), batch.response_mask.sum(-1))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_shared_prefix_hidden_states_equal_full_forward_passes(family):
    """`CausalLM.shared_prefix_hidden_states`, under `response_logprobs(prompt_once=True)`."""
    model = CausalLM(CONFIGS[family])
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(1)
    batch, prompt_len, num, response_len = 3, 5, 3, 4
    prompt_lengths, response_lengths = np.array([5, 2, 1]), rng.integers(1, response_len + 1, (batch, num))
    prompt_ids = rng.integers(1, VOCAB, (batch, prompt_len))
    prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - prompt_lengths[:, None]).astype(np.int32)
    response_ids = rng.integers(1, VOCAB, (batch, num, response_len))
    response_mask = (np.arange(response_len)[None, None] < response_lengths[..., None]).astype(np.int32)
    shared_prefix = jax.jit(lambda p, *arrays: model.apply({"params": p}, *arrays,
                                                           method="shared_prefix_hidden_states"))
    last, hidden = shared_prefix(params, prompt_ids * prompt_mask, prompt_mask, response_ids * response_mask,
                                 response_mask)
    assert last.shape == (batch, 32) and hidden.shape == (batch, num, response_len, 32)
    for b in range(batch):
        prompt = prompt_ids[b, prompt_len - prompt_lengths[b]:]
        for n in range(num):
            response = response_ids[b, n, :response_lengths[b, n]]
            sequence = jnp.asarray(np.concatenate([prompt, response])[None])
            full = forward(model, params, sequence, method="hidden_states")[0]
            np.testing.assert_allclose(last[b], full[len(prompt) - 1], atol=2e-5, rtol=2e-5)
            np.testing.assert_allclose(hidden[b, n, :len(response)], full[len(prompt):], atol=2e-5, rtol=2e-5)


def test_token_stats_match_numpy():
    """`with_vocab_stats`: the label-smoothing term mean_v log p(v) and argmax hits."""
    model = CausalLM(CONFIGS["llama"])
    params = model.init(jax.random.key(4), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=5, num=2)
    result = jax.jit(lambda p: response_logprobs(model.apply, p, batch, temperature=0.5, with_vocab_stats=True))(params)
    rows, num, length = batch.response_ids.shape
    for b in range(rows):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b] != 0]
        for n in range(num):
            count = int(batch.response_mask[b, n].sum())
            sequence = np.concatenate([prompt, batch.response_ids[b, n, :count]])[None]
            logits = np.asarray(forward(model, params, sequence), np.float64)[0, len(prompt) - 1:-1] / 0.5
            shifted = logits - logits.max(-1, keepdims=True)
            log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            np.testing.assert_allclose(result.mean_logprob[b, n, :count], log_softmax.mean(-1), atol=2e-5, rtol=1e-5)
            np.testing.assert_array_equal(result.is_argmax[b, n, :count],
                                          logits.argmax(-1) == batch.response_ids[b, n, :count])
            assert np.all(np.asarray(result.mean_logprob[b, n, count:]) == 0)


def test_prompt_once_gradients_equal_per_response_prompts():
    model = CausalLM(CONFIGS["llama"])
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=7, num=3)
    weights = jax.random.normal(jax.random.key(2), batch.response_ids.shape)

    def objective(p, prompt_once):
        return jnp.sum(weights * response_logprobs(model.apply, p, batch, prompt_once=prompt_once).logprobs)

    grad = jax.jit(jax.grad(objective), static_argnums=1)
    shared, separate = grad(params, True), grad(params, False)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(separate)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_value_model_hidden_states_share_the_prompt_too():
    module = ValueModel(CONFIGS["llama"])
    params = module.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=11, num=2)
    hidden = jax.jit(functools.partial(response_hidden_states, module.apply), static_argnames="prompt_once")
    once = hidden(params, batch, prompt_once=True)
    separate = hidden(params, batch, prompt_once=False)
    mask = np.asarray(batch.response_mask, bool)
    np.testing.assert_allclose(np.asarray(once.tokens)[mask], np.asarray(separate.tokens)[mask], atol=1e-5)
    np.testing.assert_allclose(np.asarray(once.predicting)[mask], np.asarray(separate.predicting)[mask],
                               atol=1e-5)


def test_layout_errors_name_the_array():
    batch = random_batch(seed=0)
    with pytest.raises(ValueError, match="response_ids"):
        LMBatch(batch.prompt_ids, batch.prompt_mask, batch.response_ids[:, 0], batch.response_mask[:, 0]).validate()
    with pytest.raises(ValueError, match="integer token ids"):
        LMBatch(batch.prompt_ids.astype(np.float32), batch.prompt_mask, batch.response_ids,
                batch.response_mask).validate()
    with pytest.raises(ValueError, match="rows like `prompt_ids`"):
        LMBatch(batch.prompt_ids[:2], batch.prompt_mask[:2], batch.response_ids, batch.response_mask).validate()


def test_right_padded_prompts_are_refused():
    """A Hugging Face tokenizer pads on the right by default; the first response token would
    then be scored from a pad position."""
    batch = random_batch(seed=1)
    lengths = batch.prompt_mask.sum(axis=1)
    assert lengths.min() < batch.prompt_mask.shape[1]  # some row is padded
    right_mask = (np.arange(batch.prompt_mask.shape[1])[None] < lengths[:, None]).astype(np.int32)
    right = LMBatch(batch.prompt_ids, right_mask, batch.response_ids, batch.response_mask)
    bad_row = int(np.argmax(lengths < batch.prompt_mask.shape[1]))
    with pytest.raises(ValueError, match=rf"`prompt_mask` row {bad_row} ends in padding .*padding_side"):
        right.validate()
    model = CausalLM(CONFIGS["llama"])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="LEFT-padded"):
        response_logprobs(model.apply, params, right)
    with pytest.raises(ValueError, match="LEFT-padded"):  # the model method checks too
        model.apply({"params": params}, right.prompt_ids, right.prompt_mask, right.response_ids,
                    right.response_mask, method="shared_prefix_hidden_states")


def test_rows_of_batch_padding_pass_and_score_zero():
    """The pipeline completes a last batch with rows whose masks are all 0 (`example_mask` 0)."""
    batch = random_batch(seed=2)
    zeros = lambda x: np.concatenate([x, np.zeros_like(x[:1])])
    padded = LMBatch(*(zeros(np.asarray(x)) for x in (batch.prompt_ids, batch.prompt_mask,
                                                      batch.response_ids, batch.response_mask)))
    padded.validate()
    model = CausalLM(CONFIGS["llama"])
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    logprobs = np.asarray(response_logprobs(model.apply, params, padded).logprobs)
    np.testing.assert_allclose(logprobs[:-1], response_logprobs(model.apply, params, batch).logprobs, atol=1e-5)
    assert (logprobs[-1] == 0).all()
    # an empty prompt with real response tokens is not batch padding
    answered = padded.replace(response_mask=np.concatenate([batch.response_mask, batch.response_mask[:1]]))
    with pytest.raises(ValueError, match=r"`prompt_mask` row 3 is all 0 but `response_mask` marks real tokens"):
        answered.validate()


@pytest.mark.parametrize("num", [1, 3])
def test_response_states_at_read_the_response_hidden_states(num):
    """`response_states_at` (last layer at one position per response) against
    `response_hidden_states` read there, for both prompt paths; index -1 is the prompt's last
    token. Values and gradients."""
    module = ValueModel(CONFIGS["llama"])
    params = module.init(jax.random.key(8), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=13, num=num)
    index = jnp.asarray(np.sum(batch.response_mask, -1) - 1, jnp.int32)  # -1 for empty responses
    assert np.any(np.asarray(index) == -1) or num == 1
    weights = jax.random.normal(jax.random.key(9), index.shape + (32,))

    def expected(p, prompt_once):
        hidden = response_hidden_states(module.apply, p, batch, prompt_once=prompt_once)
        ends = jnp.concatenate([hidden.predicting[:, :, :1], hidden.tokens], axis=2)  # [B, N, 1 + R, D]
        return jnp.take_along_axis(ends, (index + 1)[..., None, None], axis=2)[:, :, 0]

    for prompt_once in (True, False):
        got = jax.jit(lambda p: response_states_at(module.apply, p, batch, index, prompt_once=prompt_once))(params)
        np.testing.assert_allclose(got, jax.jit(expected, static_argnums=1)(params, prompt_once),
                                   atol=1e-5, rtol=1e-5)
        grads = [jax.jit(jax.grad(lambda p: jnp.sum(weights * fn(p))))(params) for fn in (
            lambda p: response_states_at(module.apply, p, batch, index, prompt_once=prompt_once),
            lambda p: expected(p, prompt_once))]
        for a, b in zip(*map(jax.tree.leaves, grads)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
