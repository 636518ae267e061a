"""`response_logprobs` with the chunked LM head against the full-logits head (`head_chunk_size=None`):
values and parameter gradients to 1e-5 for tied and untied heads, a soft-cap, temperature != 1,
block sizes that do and do not divide the positions, and padded responses, with and without
the kept-set thresholds of top-k / top-p sampling; and the compiled step's temporaries stay
below one `[tokens, V]` float32 array."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.ops.chunked_head import OutputHead
from rlhf_jax.training.logprobs import LMBatch, response_hidden_states, response_logprobs

VOCAB = 53


def config(family, softcap=None, vocab=VOCAB):
    if family == "gpt2":  # tied embeddings
        return ModelConfig.gpt2(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=4,
                                max_position_embeddings=32, final_logit_softcap=softcap)
    return ModelConfig.llama(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                             intermediate_size=48, final_logit_softcap=softcap)


def random_batch(seed, rows=3, prompt=4, num=2, response=5, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(1, prompt + 1, rows)
    response_lengths = rng.integers(0, response + 1, (rows, num))
    response_lengths[0, 0] = response
    response_ids = rng.integers(1, vocab, (rows, num, response)).astype(np.int32)
    response_mask = (np.arange(response)[None, None] < response_lengths[..., None]).astype(np.int32)
    return LMBatch(
        prompt_ids=rng.integers(1, vocab, (rows, prompt)).astype(np.int32),
        prompt_mask=(np.arange(prompt)[None] >= prompt - prompt_lengths[:, None]).astype(np.int32),
        response_ids=np.where(response_mask != 0, response_ids, -100).astype(np.int32),  # odd padding ids
        response_mask=response_mask,
    )


def scaled_params(model, seed):
    """Random weights scaled up so the softmax is far from uniform (and the soft-cap bites)."""
    params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)


@pytest.mark.parametrize("family,softcap,temperature,chunk", [
    ("llama", None, 0.7, 6),  # 3 * 2 * 5 = 30 positions: divides
    ("llama", 2.0, 1.0, 7),  # does not divide
    ("gpt2", None, 1.3, 30),  # one block
    ("gpt2", 3.0, 0.7, 4),
])
def test_chunked_head_matches_full_logits(family, softcap, temperature, chunk):
    model = CausalLM(config(family, softcap))
    params = scaled_params(model, 0)
    batch = random_batch(seed=1)
    rng = np.random.default_rng(2)
    weights = [jnp.asarray(rng.normal(size=batch.response_ids.shape), jnp.float32) for _ in range(3)]

    def run(p, head_chunk_size):
        return response_logprobs(model.apply, p, batch, temperature=temperature, with_entropy=True,
                                 with_vocab_stats=True, head_chunk_size=head_chunk_size)

    def objective(p, head_chunk_size):
        out = run(p, head_chunk_size)
        return sum(jnp.sum(w * x) for w, x in zip(weights, (out.logprobs, out.entropy, out.mean_logprob)))

    full, blocks = (jax.jit(run, static_argnums=1)(params, size) for size in (None, chunk))
    for name in ("logprobs", "entropy", "mean_logprob", "is_argmax", "mask"):
        np.testing.assert_allclose(getattr(blocks, name), getattr(full, name), atol=1e-5, rtol=1e-5, err_msg=name)
    padding = np.asarray(batch.response_mask) == 0
    assert np.all(np.asarray(blocks.logprobs)[padding] == 0) and np.all(np.asarray(blocks.mean_logprob)[padding] == 0)
    grad = jax.jit(jax.grad(objective), static_argnums=1)
    grads_full, grads_blocks = grad(params, None), grad(params, chunk)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads_full), jax.tree.leaves(grads_blocks)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def kept_thresholds(model, params, batch, temperature, seed):
    """Thresholds midway between the k-th and (k+1)-th largest `logits / T` of each position
    (k in {1, 2, 5, V / 2}), -inf at some positions and NaN on padding (must be ignored). The
    tokens are random, so most lie below their threshold (min(t, z_y) = z_y)."""
    hidden = response_hidden_states(model.apply, params, batch).predicting
    z = np.asarray(model.apply({"params": params}, hidden, method="lm_logits"), np.float64) / temperature
    order = np.sort(z, axis=-1)[..., ::-1]
    rng = np.random.default_rng(seed)
    kept = rng.choice([1, 2, 5, z.shape[-1] // 2], size=z.shape[:-1])
    picked = lambda k: np.take_along_axis(order, k[..., None] - 1, -1)[..., 0]
    thresholds = (picked(kept) + picked(kept + 1)) / 2
    thresholds = np.where(rng.random(z.shape[:-1]) < 0.2, -np.inf, thresholds)
    return jnp.asarray(np.where(np.asarray(batch.response_mask) != 0, thresholds, np.nan), jnp.float32)


@pytest.mark.parametrize("family,softcap,temperature,chunk", [
    ("llama", None, 0.7, 6),
    ("llama", 2.0, 1.0, 7),
    ("gpt2", 3.0, 1.3, 4),
])
def test_kept_set_chunked_head_matches_full_logits(family, softcap, temperature, chunk):
    """With kept-set thresholds the blocks agree with the full-logits replay (`kept_set_logits`)
    in values and parameter gradients, and differ from the full softmax; `full_logprobs` on both
    heads are the full softmax's (the log-probs without thresholds)."""
    model = CausalLM(config(family, softcap))
    params = scaled_params(model, 6)
    batch = random_batch(seed=7)
    thresholds = kept_thresholds(model, params, batch, temperature, seed=8)
    rng = np.random.default_rng(9)
    weights = [jnp.asarray(rng.normal(size=batch.response_ids.shape), jnp.float32) for _ in range(3)]

    def run(p, head_chunk_size, kept=thresholds):
        return response_logprobs(model.apply, p, batch, temperature=temperature, with_entropy=True,
                                 with_vocab_stats=True, head_chunk_size=head_chunk_size, kept_threshold=kept)

    def objective(p, head_chunk_size):
        out = run(p, head_chunk_size)
        return sum(jnp.sum(w * x) for w, x in zip(weights + weights[:1], (
            out.logprobs, out.entropy, out.mean_logprob, out.full_logprobs)))

    full, blocks, plain = run(params, None), run(params, chunk), run(params, chunk, None)
    for out in (full, blocks):
        np.testing.assert_allclose(out.full_logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    assert plain.full_logprobs is plain.logprobs
    for name in ("logprobs", "entropy", "mean_logprob", "is_argmax"):
        assert np.all(np.isfinite(getattr(blocks, name))), name
        np.testing.assert_allclose(getattr(blocks, name), getattr(full, name), atol=1e-5, rtol=1e-5, err_msg=name)
    assert np.abs(np.asarray(blocks.logprobs) - np.asarray(plain.logprobs)).max() > 1e-2
    np.testing.assert_array_equal(blocks.is_argmax, plain.is_argmax)
    grad = jax.jit(jax.grad(objective), static_argnums=1)
    grads_full, grads_blocks = grad(params, None), grad(params, chunk)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(grads_full), jax.tree.leaves(grads_blocks)):
        np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_output_head_matches_lm_logits():
    for family in ("llama", "gpt2"):
        model = CausalLM(config(family, softcap=2.5))
        params = scaled_params(model, 3)
        head = model.apply({"params": params}, method="output_head")
        assert isinstance(head, OutputHead) and head.softcap == 2.5 and head.vocab_major == (family == "gpt2")
        hidden = jax.random.normal(jax.random.key(4), (2, 3, 32))
        logits = model.apply({"params": params}, hidden, method="lm_logits")
        kernel = head.kernel.T if head.vocab_major else head.kernel
        np.testing.assert_allclose(logits, 2.5 * jnp.tanh(hidden @ kernel / 2.5), atol=1e-5)
        assert float(jnp.max(jnp.abs(logits))) < 2.5


def test_auto_uses_blocks_beyond_the_hidden_size():
    """"auto" keeps full logits for at most D positions, blocks beyond (the jaxpr says which)."""
    model = CausalLM(config("llama"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]

    def has_scan(batch):
        jaxpr = jax.make_jaxpr(lambda p: response_logprobs(model.apply, p, batch).logprobs)(params)
        return "scan" in str(jaxpr)

    assert not has_scan(random_batch(0, rows=2, num=2, response=8))  # 32 positions = D
    assert has_scan(random_batch(0, rows=3, num=2, response=8))  # 48 positions


def test_rejects_bad_chunk_size():
    model = CausalLM(config("llama"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="head_chunk_size"):
        response_logprobs(model.apply, params, random_batch(0), head_chunk_size=0)


@pytest.mark.parametrize("kept", [False, True])
def test_step_program_holds_no_tokens_by_vocab_logits(kept):
    """XLA's buffer assignment for value-and-gradient of the log-probs (of the kept set of
    top-k / top-p sampling with `kept`): with the chunked head the temporaries stay below one
    [tokens, V] float32 array; with full logits they exceed it."""
    vocab = 8192
    model = CausalLM(config("llama", vocab=vocab))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    batch = random_batch(seed=5, rows=4, prompt=8, num=2, response=64, vocab=vocab)
    logits_bytes = 4 * 2 * 64 * vocab * 4
    thresholds = jnp.zeros(batch.response_ids.shape, jnp.float32) if kept else None

    def temp_bytes(head_chunk_size):
        loss = lambda p: jnp.sum(response_logprobs(model.apply, p, batch, head_chunk_size=head_chunk_size,
                                                   kept_threshold=thresholds).logprobs)
        return jax.jit(jax.value_and_grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    chunked, full = temp_bytes(32), temp_bytes(None)
    assert chunked < logits_bytes / 2 < logits_bytes <= full, (chunked, full, logits_bytes)
