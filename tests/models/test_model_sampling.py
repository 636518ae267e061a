"""Next-token filters and sampling against NumPy oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rlhf_jax.models.sampling import (
    categorical, first_index, sample_tokens, select_kept_set, select_tokens, top_k_filter, top_p_filter,
)
from rlhf_jax.ops.kept_set import kept_set_logits
from rlhf_jax.ops.logprobs import token_logprobs


def oracle_top_k(logits, k):
    kth = np.sort(logits, axis=-1)[:, ::-1][:, k - 1:k]
    return logits >= kth


def oracle_top_p(logits, p):
    """Keep the most likely tokens until their mass reaches p (at least one token)."""
    kept = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits.astype(np.float64)):
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        order = np.argsort(-values, kind="stable")
        mass = 0.0
        for token in order:
            if mass >= p:
                break
            kept[row, token] = True
            mass += probs[token]
    return kept


def random_logits(seed, shape=(4, 50), scale=3.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_filter_matches_oracle(k):
    logits = random_logits(k)
    kept = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), k)))
    np.testing.assert_array_equal(kept, oracle_top_k(logits, k))
    assert (kept.sum(axis=1) == k).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.01, 0.99))
def test_top_p_filter_matches_oracle(seed, p):
    logits = random_logits(seed)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    prefix_mass = np.cumsum(np.sort(probs, axis=1)[:, ::-1], axis=1)
    assume(np.abs(prefix_mass - p).min() > 1e-5)  # float32 vs float64 ties at the boundary
    filtered = np.asarray(top_p_filter(jnp.asarray(logits), p))
    kept = np.isfinite(filtered)
    np.testing.assert_array_equal(kept, oracle_top_p(logits, p))
    np.testing.assert_array_equal(filtered[kept], logits[kept])


def test_greedy_and_logprobs():
    logits = random_logits(7)
    for temperature in (1.0, 0.5):
        tokens, logprobs = sample_tokens(None, jnp.asarray(logits), temperature=temperature, greedy=True)
        np.testing.assert_array_equal(tokens, logits.argmax(axis=1))
        scaled = logits.astype(np.float64) / temperature
        log_norm = np.log(np.exp(scaled - scaled.max(1, keepdims=True)).sum(1)) + scaled.max(1)
        expected = scaled[np.arange(4), logits.argmax(1)] - log_norm
        np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.7), (4, 0.6)])
def test_sampling_frequencies_follow_the_filtered_distribution(top_k, top_p):
    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]], np.float32)
    temperature = 0.8
    keys = jax.random.split(jax.random.PRNGKey(0), 6000)

    @jax.jit
    def draw(keys):
        return jax.vmap(lambda key: sample_tokens(key, jnp.asarray(logits), temperature=temperature,
                                                  top_k=top_k, top_p=top_p))(keys)

    tokens, logprobs = draw(keys)
    scaled = logits[0].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    kept = np.ones(8, bool)
    if top_k:
        kept &= oracle_top_k(scaled[None], top_k)[0]
    if top_p < 1:
        kept &= oracle_top_p(np.where(kept, scaled, -np.inf)[None], top_p)[0]
    target = np.where(kept, probs, 0) / np.where(kept, probs, 0).sum()
    freq = np.bincount(np.asarray(tokens)[:, 0], minlength=8) / len(keys)
    assert np.all(freq[~kept] == 0)
    np.testing.assert_allclose(freq, target, atol=0.025)
    # log-probs are those of the unfiltered tempered distribution
    np.testing.assert_allclose(logprobs[:, 0], np.log(probs)[np.asarray(tokens)[:, 0]], rtol=1e-5)


def test_invalid_options_raise():
    logits = jnp.zeros((2, 5))
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(key, logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(key, logits, top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(key, logits, temperature=0.0)
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(key, jnp.zeros(5))


def test_first_index_and_categorical():
    condition = np.array([[False, True, True], [False, False, False], [True, False, True]])
    np.testing.assert_array_equal(first_index(jnp.asarray(condition)), [1, 3, 0])
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.0, 0.3, 0.4]]))
    keys = jax.random.split(jax.random.PRNGKey(1), 8000)
    draws = np.asarray(jax.jit(jax.vmap(lambda key: categorical(key, logits)))(keys))[:, 0]
    np.testing.assert_allclose(np.bincount(draws, minlength=5) / len(keys), [0.1, 0.2, 0, 0.3, 0.4], atol=0.02)


def test_select_tokens_is_sample_tokens_with_given_uniforms():
    logits = jnp.asarray(random_logits(11))
    uniforms = jnp.array([1.0, 0.5, 1e-7, 0.999])  # (0, 1]: the ends pick the last / first token
    tokens, logprobs = select_tokens(logits, uniforms, temperature=0.9)
    probs = np.asarray(jax.nn.softmax(logits / 0.9, axis=-1), np.float64)
    cdf = np.cumsum(probs, axis=1)
    expected = [int(np.argmax(cdf[row] >= u * cdf[row, -1] - 1e-6)) for row, u in enumerate(np.asarray(uniforms))]
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_allclose(logprobs, np.log(probs[np.arange(4), expected]), rtol=1e-5)


@pytest.mark.parametrize("top_k, top_p, temperature", [(5, 1.0, 1.0), (0, 0.7, 1.0), (8, 0.8, 0.6),
                                                       (0, 1.0, 1.3)])
def test_select_kept_set_matches_oracle(top_k, top_p, temperature):
    """The kept set's threshold and the renormalised log-prob against NumPy, and the same
    tokens and full log-probs as `select_tokens`."""
    logits = random_logits(11, shape=(6, 40))
    uniforms = np.random.default_rng(12).uniform(0.01, 1.0, 6).astype(np.float32)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    chosen = select_kept_set(jnp.asarray(logits), jnp.asarray(uniforms), **options)
    tokens, logprobs = select_tokens(jnp.asarray(logits), jnp.asarray(uniforms), **options)
    np.testing.assert_array_equal(chosen.tokens, tokens)
    np.testing.assert_array_equal(chosen.logprobs, logprobs)
    scaled = logits.astype(np.float64) / temperature
    kept = np.ones(scaled.shape, bool)
    if top_k:
        kept &= oracle_top_k(scaled, top_k)
    if top_p < 1:
        kept &= oracle_top_p(np.where(kept, scaled, -np.inf), top_p)
    midpoint = (np.where(kept, scaled, np.inf).min(1) + np.where(kept, -np.inf, scaled).max(1)) / 2
    np.testing.assert_allclose(chosen.kept_threshold, midpoint, rtol=1e-6)
    np.testing.assert_array_equal(scaled >= np.asarray(chosen.kept_threshold)[:, None], kept)
    rows = np.arange(6)
    assert kept[rows, np.asarray(tokens)].all()
    kept_norm = np.log(np.where(kept, np.exp(scaled), 0.0).sum(1))
    np.testing.assert_allclose(chosen.kept_logprobs, scaled[rows, tokens] - kept_norm, atol=1e-5)
    if top_k or top_p < 1:
        assert (np.asarray(chosen.kept_logprobs) > np.asarray(logprobs) + 1e-3).all()
    else:
        np.testing.assert_allclose(chosen.kept_logprobs, logprobs, atol=1e-6)


def test_kept_set_logits_replay_the_sampler():
    """`kept_set_logits` with the sampler's thresholds gives back its kept-set log-probs, keeps
    the drawn token even below the threshold, and keeps everything at threshold -inf."""
    logits = random_logits(13, shape=(6, 40))
    uniforms = jnp.asarray(np.random.default_rng(14).uniform(0.01, 1.0, 6).astype(np.float32))
    chosen = select_kept_set(jnp.asarray(logits), uniforms, temperature=0.7, top_k=6, top_p=0.9)
    replayed = kept_set_logits(jnp.asarray(logits), chosen.tokens, chosen.kept_threshold, temperature=0.7)
    np.testing.assert_allclose(token_logprobs(replayed, chosen.tokens, temperature=0.7),
                               chosen.kept_logprobs, atol=1e-6)
    # Logits that round differently from the sampler's (a KV-cache step vs a forward pass)
    # still replay the same kept set: the threshold lies midway between kept and excluded.
    lowered = logits - 1e-6 * np.abs(logits)
    replayed = kept_set_logits(jnp.asarray(lowered), chosen.tokens, chosen.kept_threshold, temperature=0.7)
    np.testing.assert_allclose(token_logprobs(replayed, chosen.tokens, temperature=0.7),
                               chosen.kept_logprobs, atol=1e-5)
    above = kept_set_logits(jnp.asarray(logits), chosen.tokens, jnp.full((6,), 1e9), temperature=0.7)
    # A threshold above every logit keeps the drawn token and those at least as likely.
    drawn = logits[np.arange(6), np.asarray(chosen.tokens)]
    np.testing.assert_array_equal(np.isfinite(np.asarray(above)), logits >= drawn[:, None])
    everything = kept_set_logits(jnp.asarray(logits), chosen.tokens, jnp.full((6,), -jnp.inf))
    np.testing.assert_array_equal(everything, logits)
    with pytest.raises(ValueError, match="threshold"):
        kept_set_logits(jnp.asarray(logits), chosen.tokens, chosen.kept_threshold[:3])
