"""`chunked_head_stats` against a NumPy float64 head (values) and autodiff of a full-logits JAX
head written from the formulas (gradients to hidden and kernel); and a check on the compiled
program that no `[tokens, V]` array exists in the forward or backward pass. The same for the
kept-set statistics of top-k / top-p sampling (`kept_threshold`), with the full-logits replay
`kept_set_logits` as the gradient reference."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops.chunked_head import HeadStats, OutputHead, chunked_head_stats, default_chunk_size, head_logits
from rlhf_jax.ops.kept_set import kept_set_logits
from rlhf_jax.ops.logprobs import entropy_from_logits, token_logprobs

VOCAB, DIM = 37, 8


def make_inputs(seed, shape=(3, 5), vocab=VOCAB, dim=DIM, vocab_major=False, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(*shape, dim)).astype(np.float32)
    kernel = (scale * rng.normal(size=(vocab, dim) if vocab_major else (dim, vocab))).astype(np.float32)
    tokens = rng.integers(0, vocab, shape).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(tokens)


def numpy_stats(hidden, kernel, tokens, vocab_major, softcap, temperature):
    """The statistics in float64 NumPy, straight from the definitions."""
    h = np.asarray(hidden, np.float64)
    w = np.asarray(kernel, np.float64)
    a = h @ (w.T if vocab_major else w)
    if softcap is not None:
        a = softcap * np.tanh(a / softcap)
    z = a / temperature
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    logp = z - lse[..., None]
    p = np.exp(logp)
    picked = np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
    return dict(logprobs=picked, logsumexp=lse, mean_logit=z.mean(-1), entropy=-(p * logp).sum(-1),
                is_argmax=(z.argmax(-1) == np.asarray(tokens)).astype(np.float64))


def reference_stats(hidden, kernel, tokens, vocab_major, softcap, temperature):
    """Full-logits JAX version of the same statistics (autodiff gives the reference gradients)."""
    a = hidden @ (kernel.T if vocab_major else kernel)
    if softcap is not None:
        a = softcap * jnp.tanh(a / softcap)
    z = a / temperature
    logp = jax.nn.log_softmax(z, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    lse = jax.nn.logsumexp(z, axis=-1)
    return picked, lse, z.mean(-1), -(jnp.exp(logp) * logp).sum(-1)


def chunked(hidden, kernel, tokens, vocab_major, softcap, temperature, chunk_size, kept_threshold=None):
    head = OutputHead(kernel, vocab_major=vocab_major, softcap=softcap)
    return chunked_head_stats(hidden, head, tokens, temperature=temperature, chunk_size=chunk_size,
                              kept_threshold=kept_threshold)


CASES = [  # (vocab_major, softcap, temperature, chunk_size)
    (False, None, 1.0, 5),  # divides 15 positions
    (False, None, 0.7, 4),  # does not divide
    (True, None, 1.3, 6),
    (False, 3.0, 0.7, 4),
    (True, 2.5, 1.0, 15),  # one block
    (False, None, 1.0, 64),  # block larger than the positions
    (True, 3.0, 0.5, 1),
]


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", CASES)
def test_values_match_numpy(vocab_major, softcap, temperature, chunk_size):
    hidden, kernel, tokens = make_inputs(0, vocab_major=vocab_major, scale=2.0)
    argmax = np.argmax(np.asarray(hidden) @ np.asarray(kernel.T if vocab_major else kernel), -1)
    tokens = jnp.asarray(np.where(np.arange(tokens.shape[1]) % 2 == 0, argmax, tokens), jnp.int32)
    stats = jax.jit(chunked, static_argnums=(3, 4, 6))(hidden, kernel, tokens, vocab_major, softcap,
                                                       temperature, chunk_size)
    expected = numpy_stats(hidden, kernel, tokens, vocab_major, softcap, temperature)
    chex.assert_shape(list(stats), tokens.shape)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(stats, name)), value, atol=1e-5, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(stats.mean_logprob, expected["mean_logit"] - expected["logsumexp"], atol=1e-5)
    assert 0 < expected["is_argmax"].mean() < 1


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", CASES)
def test_gradients_match_full_logits(vocab_major, softcap, temperature, chunk_size):
    hidden, kernel, tokens = make_inputs(1, vocab_major=vocab_major, scale=2.0)
    rng = np.random.default_rng(2)
    mask = jnp.asarray(rng.random(tokens.shape) < 0.7, jnp.float32)  # padding gets no gradient
    weights = [jnp.asarray(rng.normal(size=tokens.shape), jnp.float32) * mask for _ in range(4)]

    def objective(stats_fn):
        def total(h, w):
            return sum(jnp.sum(c * jnp.where(mask != 0, s, 0.0)) for c, s in zip(weights, stats_fn(h, w)))
        return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))

    full = objective(lambda h, w: reference_stats(h, w, tokens, vocab_major, softcap, temperature))
    blocks = objective(lambda h, w: chunked(h, w, tokens, vocab_major, softcap, temperature, chunk_size)[:4])
    (value_full, grads_full), (value_blocks, grads_blocks) = full(hidden, kernel), blocks(hidden, kernel)
    np.testing.assert_allclose(value_blocks, value_full, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads_blocks, grads_full, ("hidden", "kernel")):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)
    masked_rows = np.asarray(grads_blocks[0])[np.asarray(mask) == 0]
    assert np.all(masked_rows == 0)


def test_each_statistic_has_its_own_gradient():
    """One statistic at a time, so a wrong term cannot hide behind another's."""
    hidden, kernel, tokens = make_inputs(3, vocab_major=False, scale=1.5)
    for index in range(4):
        full = jax.grad(lambda h, w: jnp.sum(reference_stats(h, w, tokens, False, 4.0, 0.8)[index]), (0, 1))
        blocks = jax.grad(lambda h, w: jnp.sum(chunked(h, w, tokens, False, 4.0, 0.8, 4)[index]), (0, 1))
        for got, want in zip(blocks(hidden, kernel), full(hidden, kernel)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=HeadStats._fields[index])


def test_is_argmax_has_zero_gradient_and_temperature_gets_none():
    hidden, kernel, tokens = make_inputs(4)
    grads = jax.grad(lambda h, t: jnp.sum(chunked(h, kernel, tokens, False, None, t, 4).is_argmax),
                     argnums=(0, 1))(hidden, 1.0)
    assert np.all(np.asarray(grads[0]) == 0) and float(grads[1]) == 0.0


def test_bfloat16_compute_accumulates_in_float32():
    hidden, kernel, tokens = make_inputs(5, shape=(4, 6))
    head = OutputHead(kernel.astype(jnp.bfloat16))
    stats = chunked_head_stats(hidden.astype(jnp.bfloat16), head, tokens, chunk_size=5)
    full = head_logits(hidden.astype(jnp.bfloat16), head)  # the model's bf16 x bf16 -> f32 product
    assert full.dtype == jnp.float32 and stats.logprobs.dtype == jnp.float32
    expected = jax.nn.log_softmax(full, -1)
    np.testing.assert_allclose(stats.logprobs, jnp.take_along_axis(expected, tokens[..., None], -1)[..., 0],
                               atol=1e-5)
    grads = jax.grad(lambda h, w: jnp.sum(chunked_head_stats(h, OutputHead(w), tokens, chunk_size=5).logprobs),
                     (0, 1))(hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    full_grads = jax.grad(lambda h, w: jnp.sum(reference_stats(h, w, tokens, False, None, 1.0)[0]), (0, 1))(
        hidden.astype(jnp.bfloat16).astype(jnp.float32), kernel.astype(jnp.bfloat16).astype(jnp.float32))
    for got, want in zip(grads, full_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05, rtol=0.05)


def test_rejects_bad_inputs():
    hidden, kernel, tokens = make_inputs(6)
    with pytest.raises(ValueError, match="hidden size"):
        chunked_head_stats(hidden[..., :4], OutputHead(kernel), tokens)
    with pytest.raises(ValueError, match="tokens"):
        chunked_head_stats(hidden, OutputHead(kernel), tokens[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        chunked_head_stats(hidden, OutputHead(kernel), tokens, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_head_stats(hidden, OutputHead(kernel), tokens, chunk_size=0)
    with pytest.raises(ValueError, match="soft-cap"):
        chunked_head_stats(hidden, OutputHead(kernel, softcap=-1.0), tokens)


def test_default_chunk_size_bounds_block_logits():
    assert default_chunk_size(151_936) * 151_936 <= 1 << 24
    assert default_chunk_size(10**9) == 8


def _array_shapes(jaxpr):
    """Every array shape in a closed jaxpr, sub-jaxprs (scan bodies, custom VJPs) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                shapes += _array_shapes(inner)
            if isinstance(param, (tuple, list)):
                shapes += [s for p in param if hasattr(getattr(p, "jaxpr", p), "eqns")
                           for s in _array_shapes(getattr(p, "jaxpr", p))]
    return shapes


@pytest.mark.parametrize("vocab_major", [False, True])
def test_no_tokens_by_vocab_array_forward_or_backward(vocab_major):
    """The property itself: the value-and-gradient program never holds [tokens, V] logits,
    in its jaxpr (every equation, scan bodies included) or in XLA's compiled buffers."""
    tokens_count, vocab, dim, chunk = 512, 4096, 16, 32
    hidden, kernel, tokens = make_inputs(7, shape=(tokens_count,), vocab=vocab, dim=dim, vocab_major=vocab_major)

    def loss(h, w, stats_fn):
        return jnp.sum(stats_fn(h, w))

    chunked_loss = jax.value_and_grad(
        lambda h, w: loss(h, w, lambda h, w: chunked(h, w, tokens, vocab_major, 2.0, 0.9, chunk).logprobs), (0, 1))
    full_loss = jax.value_and_grad(
        lambda h, w: loss(h, w, lambda h, w: reference_stats(h, w, tokens, vocab_major, 2.0, 0.9)[0]), (0, 1))

    shapes = _array_shapes(jax.make_jaxpr(chunked_loss)(hidden, kernel).jaxpr)
    big = [s for s in shapes if np.prod(s, dtype=np.int64) >= tokens_count * vocab // 2]
    assert not big, big
    assert (chunk, vocab) in shapes  # the blocks are there
    assert any(np.prod(s) >= tokens_count * vocab for s in _array_shapes(jax.make_jaxpr(full_loss)(hidden, kernel).jaxpr))

    def temp_bytes(fn):
        return jax.jit(fn).lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = tokens_count * vocab * 4
    assert temp_bytes(chunked_loss) < logits_bytes / 2
    assert temp_bytes(full_loss) >= logits_bytes


# Kept-set replay (top-k / top-p): every statistic of the kept distribution, kept_v = z_v >= min(t, z_y).

def kept_thresholds(z, tokens, seed):
    """Per-position thresholds in units of z (float64 z [..., V]) and drawn tokens that cover
    the cases: -inf (nothing excluded), the top 1 or 3 kept (most of the vocabulary cut), the
    top half kept, and the top 2 kept with the drawn token below the threshold (so the kept set
    is everything from z_y up: min(t, z_y) = z_y)."""
    rng = np.random.default_rng(seed)
    flat_z, flat_tokens = z.reshape(-1, z.shape[-1]), np.asarray(tokens).reshape(-1).copy()
    order = np.sort(flat_z, axis=-1)[:, ::-1]
    thresholds = np.empty(len(flat_z))
    for i, kind in enumerate(rng.permutation(np.arange(len(flat_z)) % 5)):
        if kind == 0:
            thresholds[i] = -np.inf
            continue
        kept = {1: 1, 2: 3, 3: z.shape[-1] // 2, 4: 2}[kind]
        thresholds[i] = (order[i, kept - 1] + order[i, kept]) / 2  # midway, as the sampler records
        ranked = np.argsort(flat_z[i])[::-1]
        # a token from the kept set, as the sampler draws; for kind 4 one below the threshold
        flat_tokens[i] = ranked[kept + rng.integers(0, z.shape[-1] - kept)] if kind == 4 else ranked[
            rng.integers(0, kept)]
    return (jnp.asarray(thresholds.reshape(z.shape[:-1]), jnp.float32),
            jnp.asarray(flat_tokens.reshape(z.shape[:-1]), jnp.int32))


def numpy_scaled_logits(hidden, kernel, vocab_major, softcap, temperature):
    a = np.asarray(hidden, np.float64) @ np.asarray(kernel.T if vocab_major else kernel, np.float64)
    return (a if softcap is None else softcap * np.tanh(a / softcap)) / temperature


def numpy_kept_stats(z, tokens, thresholds):
    """The kept-set statistics in float64 NumPy from the definitions: kept_v = z_v >= min(t, z_y),
    lse = log sum_{kept} exp z_v, log p_y = z_y - lse, p_v = exp(z_v - lse) on the kept set (0
    elsewhere), entropy = lse - sum_v p_v z_v; mean_logit and is_argmax over the whole vocabulary."""
    tokens, t = np.asarray(tokens), np.asarray(thresholds, np.float64)
    z_y = np.take_along_axis(z, tokens[..., None], -1)[..., 0]
    kept = z >= np.minimum(t, z_y)[..., None]
    top = z.max(-1)
    lse = top + np.log(np.where(kept, np.exp(z - top[..., None]), 0.0).sum(-1))
    p = np.where(kept, np.exp(z - lse[..., None]), 0.0)
    return dict(logprobs=z_y - lse, logsumexp=lse, mean_logit=z.mean(-1), entropy=lse - (p * z).sum(-1),
                is_argmax=(z.argmax(-1) == tokens).astype(np.float64)), kept


def kept_reference_stats(hidden, kernel, tokens, thresholds, vocab_major, softcap, temperature):
    """Full logits through `kept_set_logits` + `token_logprobs` + `entropy_from_logits` (the
    kept-set replay the trainer used before the blocks), for autodiff reference gradients."""
    logits = head_logits(hidden, OutputHead(kernel, vocab_major=vocab_major, softcap=softcap))
    scored = kept_set_logits(logits, tokens, thresholds, temperature=temperature)
    return (token_logprobs(scored, tokens, temperature=temperature), jax.nn.logsumexp(scored / temperature, -1),
            jnp.mean(logits / temperature, -1), entropy_from_logits(scored, temperature=temperature))


def kept_inputs(seed, vocab_major, softcap, temperature, shape=(3, 5)):
    hidden, kernel, tokens = make_inputs(seed, shape=shape, vocab_major=vocab_major, scale=2.0)
    z = numpy_scaled_logits(hidden, kernel, vocab_major, softcap, temperature)
    thresholds, tokens = kept_thresholds(z, tokens, seed + 100)
    return hidden, kernel, tokens, thresholds, z


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", CASES)
def test_kept_set_values_match_numpy(vocab_major, softcap, temperature, chunk_size):
    hidden, kernel, tokens, thresholds, z = kept_inputs(10, vocab_major, softcap, temperature)
    stats = jax.jit(chunked, static_argnums=(3, 4, 6))(hidden, kernel, tokens, vocab_major, softcap,
                                                       temperature, chunk_size, thresholds)
    expected, kept = numpy_kept_stats(z, tokens, thresholds)
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(stats, name)), value, atol=1e-5, rtol=1e-5, err_msg=name)
    # the cases are there: nothing excluded, most of the vocabulary cut, drawn token below t
    t, z_y = np.asarray(thresholds), np.take_along_axis(z, np.asarray(tokens)[..., None], -1)[..., 0]
    assert np.isneginf(t).any() and (kept.sum(-1) <= 3).any() and (z_y < t).any()
    full = numpy_stats(hidden, kernel, tokens, vocab_major, softcap, temperature)
    cut = kept.sum(-1) < z.shape[-1]
    gain = np.asarray(stats.logprobs)[cut] - full["logprobs"][cut]  # renormalised: log(1 / kept mass) >= 0
    assert gain.min() > -1e-5 and gain.max() > 1e-2
    np.testing.assert_allclose(np.asarray(stats.logprobs)[~cut], full["logprobs"][~cut], atol=1e-5)
    # the unfiltered softmax's log-probs and logsumexp come out of the same pass
    np.testing.assert_allclose(np.asarray(stats.full_logsumexp), full["logsumexp"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.full_logprobs), full["logprobs"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", CASES)
def test_kept_set_gradients_match_full_logits(vocab_major, softcap, temperature, chunk_size):
    hidden, kernel, tokens, thresholds, _ = kept_inputs(11, vocab_major, softcap, temperature)
    rng = np.random.default_rng(12)
    weights = [jnp.asarray(rng.normal(size=tokens.shape), jnp.float32) for _ in range(4)]

    def objective(stats_fn):
        def total(h, w):
            return sum(jnp.sum(c * s) for c, s in zip(weights, stats_fn(h, w)))
        return jax.jit(jax.value_and_grad(total, argnums=(0, 1)))

    full = objective(lambda h, w: kept_reference_stats(h, w, tokens, thresholds, vocab_major, softcap, temperature))
    blocks = objective(lambda h, w: chunked(h, w, tokens, vocab_major, softcap, temperature, chunk_size,
                                            thresholds)[:4])
    (value_full, grads_full), (value_blocks, grads_blocks) = full(hidden, kernel), blocks(hidden, kernel)
    np.testing.assert_allclose(value_blocks, value_full, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads_blocks, grads_full, ("hidden", "kernel")):
        # 1e-5 of the largest entry: both sides are float32 sums of terms up to |z| ~ 10 here
        np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=1e-5, err_msg=name)


def test_kept_set_threshold_gets_no_gradient_and_is_checked():
    hidden, kernel, tokens, thresholds, _ = kept_inputs(13, False, None, 1.0)
    grad = jax.grad(lambda t: jnp.sum(chunked(hidden, kernel, tokens, False, None, 1.0, 4, t).logprobs))(thresholds)
    assert np.all(np.asarray(grad) == 0)
    with pytest.raises(ValueError, match="kept_threshold"):
        chunked(hidden, kernel, tokens, False, None, 1.0, 4, thresholds[:, :2])


@pytest.mark.parametrize("vocab_major", [False, True])
def test_kept_set_program_holds_no_tokens_by_vocab_array(vocab_major):
    """Value-and-gradient of the kept-set log-probs: no [tokens, V] array in the jaxpr, and
    XLA's temporaries stay below half of one [tokens, V] float32 array; the full-logits replay
    (`kept_set_logits`) holds at least one."""
    tokens_count, vocab, dim, chunk = 512, 4096, 16, 32
    hidden, kernel, tokens = make_inputs(14, shape=(tokens_count,), vocab=vocab, dim=dim, vocab_major=vocab_major)
    thresholds = jnp.asarray(np.random.default_rng(15).normal(size=tokens_count), jnp.float32)
    blocks = jax.value_and_grad(lambda h, w: jnp.sum(
        chunked(h, w, tokens, vocab_major, 2.0, 0.9, chunk, thresholds).logprobs), (0, 1))
    full = jax.value_and_grad(lambda h, w: jnp.sum(
        kept_reference_stats(h, w, tokens, thresholds, vocab_major, 2.0, 0.9)[0]), (0, 1))
    shapes = _array_shapes(jax.make_jaxpr(blocks)(hidden, kernel).jaxpr)
    assert not [s for s in shapes if np.prod(s, dtype=np.int64) >= tokens_count * vocab // 2]
    assert (chunk, vocab) in shapes

    def temp_bytes(fn):
        return jax.jit(fn).lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = tokens_count * vocab * 4
    assert temp_bytes(blocks) < logits_bytes / 2 < logits_bytes <= temp_bytes(full)


@pytest.mark.parametrize("vocab_major,softcap,temperature,chunk_size", CASES[:4])
def test_full_logprobs_gradient_with_a_kept_set(vocab_major, softcap, temperature, chunk_size):
    """With kept-set thresholds, a loss reading both the kept log-probs (ratios) and the full
    softmax's (a KL) differentiates as autodiff of full logits does (`log_softmax` for the
    second); without thresholds `full_logprobs` is `logprobs`, gradient included."""
    hidden, kernel, tokens, thresholds, _ = kept_inputs(14, vocab_major, softcap, temperature)
    rng = np.random.default_rng(15)
    w_kept, w_full = (jnp.asarray(rng.normal(size=tokens.shape), jnp.float32) for _ in range(2))

    def reference(h, w):
        logits = head_logits(h, OutputHead(w, vocab_major=vocab_major, softcap=softcap))
        kept = token_logprobs(kept_set_logits(logits, tokens, thresholds, temperature=temperature), tokens,
                              temperature=temperature)
        full = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature), tokens[..., None], -1)[..., 0]
        return jnp.sum(w_kept * kept) + jnp.sum(w_full * full)

    def blocks(h, w, t=thresholds):
        stats = chunked(h, w, tokens, vocab_major, softcap, temperature, chunk_size, t)
        return jnp.sum(w_kept * stats.logprobs) + jnp.sum(w_full * stats.full_logprobs)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hidden, kernel)
    (value_ref, grads_ref), (value, grads) = grad(reference), grad(blocks)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, grads_ref, ("hidden", "kernel")):
        np.testing.assert_allclose(got, want, atol=1e-5 * float(np.abs(want).max()), rtol=1e-5, err_msg=name)
    plain = jax.jit(jax.grad(lambda h: jnp.sum(chunked(h, kernel, tokens, vocab_major, softcap, temperature,
                                                          chunk_size).full_logprobs)))(hidden)
    twice = jax.jit(jax.grad(lambda h: jnp.sum(chunked(h, kernel, tokens, vocab_major, softcap, temperature,
                                                          chunk_size).logprobs)))(hidden)
    np.testing.assert_allclose(plain, twice, atol=1e-6)
