import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs

BATCH, TIME, VOCAB = 3, 7, 11


def np_log_softmax(logits, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def oracle_token_logprobs(logits, tokens, temperature=1.0):
    log_probs = np_log_softmax(logits, temperature)
    out = np.zeros(tokens.shape)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            out[b, t] = log_probs[b, t, tokens[b, t]]
    return out


def oracle_sequence_logprobs(logits, input_ids, mask, temperature, reduce):
    log_probs = np_log_softmax(logits, temperature)
    out = np.zeros(input_ids.shape[0])
    for b in range(input_ids.shape[0]):
        total, count = 0.0, 0.0
        for t in range(1, input_ids.shape[1]):
            if mask[b, t]:
                total += log_probs[b, t - 1, input_ids[b, t]]
                count += 1
        out[b] = total / max(count, 1.0) if reduce == "mean" else total
    return out


def oracle_entropy(logits, temperature=1.0):
    log_probs = np_log_softmax(logits, temperature)
    probs = np.exp(log_probs)
    finite_log_probs = np.where(probs > 0, log_probs, 0.0)
    return -np.sum(probs * finite_log_probs, axis=-1)


def random_batch(seed, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(BATCH, TIME, VOCAB)) * scale).astype(np.float32)
    tokens = rng.integers(0, VOCAB, size=(BATCH, TIME)).astype(np.int32)
    prompt_len = rng.integers(1, 4, size=BATCH)
    total_len = np.array([TIME, 4, 5])  # right padding after the response
    positions = np.arange(TIME)[None, :]
    mask = (positions >= prompt_len[:, None]) & (positions < total_len[:, None])
    return logits, tokens, mask


jit_token_logprobs = jax.jit(token_logprobs)
jit_sequence_logprobs = jax.jit(sequence_logprobs, static_argnames="reduce")
jit_entropy = jax.jit(entropy_from_logits)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_match_oracle(temperature):
    logits, tokens, _ = random_batch(seed=int(temperature * 10))
    want = oracle_token_logprobs(logits, tokens, temperature)
    for fn in (token_logprobs, jit_token_logprobs):
        got = fn(logits, tokens, temperature=temperature)
        assert got.shape == (BATCH, TIME) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(temperature=st.floats(0.05, 5.0), seed=st.integers(0, 2**16))
def test_token_logprobs_at_temperature_is_log_softmax_of_scaled_logits(temperature, seed):
    logits, tokens, _ = random_batch(seed)
    got = jit_token_logprobs(logits, tokens, temperature=temperature)
    want = oracle_token_logprobs(logits / np.float64(temperature), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_token_logprobs_bfloat16_logits_are_scored_in_float32():
    logits, tokens, _ = random_batch(seed=1)
    low = jnp.asarray(logits, jnp.bfloat16)
    got = token_logprobs(low, tokens)
    assert got.dtype == jnp.float32
    want = oracle_token_logprobs(np.asarray(low.astype(jnp.float32)), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_logprobs_traced_temperature_vmap_and_grad():
    logits, tokens, _ = random_batch(seed=2)
    got = jax.jit(lambda l, t, temp: token_logprobs(l, t, temperature=temp))(logits, tokens, jnp.float32(0.8))
    np.testing.assert_allclose(got, oracle_token_logprobs(logits, tokens, 0.8), rtol=1e-5, atol=1e-5)
    per_row = jax.vmap(token_logprobs)(logits, tokens)
    np.testing.assert_allclose(per_row, token_logprobs(logits, tokens), rtol=1e-6, atol=1e-6)
    # d/dz log softmax(z)[k] = onehot(k) - softmax(z): positive on the token, negative elsewhere.
    grad = jax.jit(jax.grad(lambda l: token_logprobs(l, tokens).sum()))(logits)
    want = np.eye(VOCAB)[tokens] - np.exp(np_log_softmax(logits))
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sequence_logprobs_match_oracle(reduce, temperature):
    logits, tokens, mask = random_batch(seed=3)
    for mask_dtype in (bool, np.float32):
        want = oracle_sequence_logprobs(logits, tokens, mask, temperature, reduce)
        for fn in (sequence_logprobs, jit_sequence_logprobs):
            got = fn(logits, tokens, mask.astype(mask_dtype), temperature=temperature, reduce=reduce)
            assert got.shape == (BATCH,) and got.dtype == jnp.float32
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_shift_and_guarded_mean():
    logits, tokens, _ = random_batch(seed=4)
    only_first = np.zeros((BATCH, TIME), bool)
    only_first[:, 0] = True  # nothing predicts token 0: counts nothing
    for reduce in ("sum", "mean"):
        got = sequence_logprobs(logits, tokens, only_first, reduce=reduce)
        np.testing.assert_array_equal(got, np.zeros(BATCH))
    one_token = np.zeros((BATCH, TIME), bool)
    one_token[:, 2] = True
    got = sequence_logprobs(logits, tokens, one_token, reduce="mean")
    # token 2 is scored by the logits at position 1
    np.testing.assert_allclose(got, oracle_token_logprobs(logits[:, 1:2], tokens[:, 2:3])[:, 0], rtol=1e-5)


def test_sequence_logprobs_ignore_nonfinite_padding():
    logits, tokens, mask = random_batch(seed=5)
    pad_id = 0
    logits = logits.copy()
    logits[..., pad_id] = -np.inf  # the model never predicts the pad token
    tokens = np.where(mask, np.where(tokens == pad_id, 1, tokens), pad_id).astype(np.int32)
    want = oracle_sequence_logprobs(logits, tokens, mask, 1.0, "sum")
    got = jit_sequence_logprobs(logits, tokens, mask, reduce="sum")
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda l: sequence_logprobs(l, tokens, mask).sum()))(logits)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_matches_oracle(temperature):
    logits, _, _ = random_batch(seed=6)
    want = oracle_entropy(logits, temperature)
    for fn in (entropy_from_logits, jit_entropy):
        got = fn(logits, temperature=temperature)
        assert got.shape == (BATCH, TIME) and got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_entropy_bounds_uniform_and_masked_vocabulary():
    logits, _, _ = random_batch(seed=7, scale=30.0)
    entropy = np.asarray(jit_entropy(logits))
    assert np.all(entropy >= -1e-6) and np.all(entropy <= np.log(VOCAB) + 1e-5)
    uniform = np.zeros_like(logits)
    np.testing.assert_allclose(jit_entropy(uniform), np.full((BATCH, TIME), np.log(VOCAB)), rtol=1e-6)
    top_k = logits.copy()
    top_k[..., 5:] = -np.inf
    np.testing.assert_allclose(jit_entropy(top_k), oracle_entropy(top_k), rtol=1e-5, atol=1e-5)
    entropy_grad = jax.jit(jax.grad(lambda l: entropy_from_logits(l).sum()))
    assert np.all(np.isfinite(entropy_grad(top_k)))
    # Raising the top logit of a confident distribution makes it more peaked: entropy falls.
    peaked = np.zeros_like(logits)
    peaked[..., 0] = 4.0
    assert np.all(np.asarray(entropy_grad(peaked))[..., 0] < 0)


def test_bad_inputs_raise():
    logits, tokens, mask = random_batch(seed=8)
    with pytest.raises(ValueError, match="`logits` must have shape"):
        token_logprobs(logits[:, :-1], tokens)
    with pytest.raises(ValueError, match="`tokens` must be an integer"):
        token_logprobs(logits, tokens.astype(np.float32))
    with pytest.raises(ValueError, match="`logits` must be a floating-point"):
        token_logprobs(tokens[..., None], tokens)
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        token_logprobs(logits, tokens, temperature=0.0)
    with pytest.raises(ValueError, match="`mask` has shape"):
        sequence_logprobs(logits, tokens, mask[:, 1:])
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        sequence_logprobs(logits, tokens, mask, reduce="max")
    with pytest.raises(ValueError, match="at least 2 time steps"):
        sequence_logprobs(logits[:, :1], tokens[:, :1], mask[:, :1])
    with pytest.raises(ValueError, match="`temperature` must be a scalar"):
        entropy_from_logits(logits, temperature=np.ones(3, np.float32))


def test_token_ids_outside_the_vocabulary_are_named_not_nan():
    """Concrete arrays: an id outside [0, V) raises, naming its index; under jit it is NaN
    (nothing can raise there). sequence_logprobs never reads ids under mask 0."""
    logits, tokens, mask = random_batch(seed=9)
    vocab = logits.shape[-1]
    for bad in (-100, vocab):
        wrong = tokens.copy()
        wrong[1, 2] = bad
        with pytest.raises(ValueError, match=rf"`tokens` holds token id {bad} at index \[1, 2\]"):
            token_logprobs(logits, wrong)
        assert np.isnan(np.asarray(jit_token_logprobs(logits, wrong))[1, 2])
    ignored = np.where(np.asarray(mask) != 0, tokens, -100)
    ignored[:, 0] = -100  # nothing predicts the first token
    np.testing.assert_array_equal(np.asarray(sequence_logprobs(logits, ignored, mask)),
                                  np.asarray(sequence_logprobs(logits, tokens, mask)))
