"""Blockwise attention against a NumPy softmax-attention oracle (values) and against autodiff of
a plain jnp softmax attention (gradients), on left-padded, windowed, soft-capped GQA inputs
with block sizes that do not divide the lengths; the rows' log-sum-exp and its gradient against
NumPy and jax.grad of a plain logsumexp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops.blockwise_attention import blockwise_attention, blockwise_attention_with_lse

MIN = np.finfo(np.float32).min


def numpy_attention(q, k, v, mask, softcap):
    """float64 reference: softmax(cap(q k) masked to MIN) v, per (batch, kv head, group)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bkgqd,bkds->bkgqs", q, k)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.asarray(mask)[:, None, None], scores, MIN)
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bkgqs,bksd->bkgqd", weights, v)


def plain_attention(q, k, v, mask, softcap):
    scores = jnp.einsum("bkgqd,bkds->bkgqs", q, k)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, None], scores, MIN)
    return jnp.einsum("bkgqs,bksd->bkgqd", jax.nn.softmax(scores, -1), v)


def inputs(seed, batch=2, kv_heads=2, groups=2, time=19, slots=23, head_dim=8, window=None):
    """Random q, k, v and a mask of queries at the last `time` of `slots` key slots (as after
    a cached prompt), causal, rows left-padded by 0 and 4 slots, optionally windowed; row 1's
    first query slots see no key at all (left padding queries)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, kv_heads, groups, time, head_dim)).astype(np.float32)
    k = rng.normal(size=(batch, kv_heads, head_dim, slots)).astype(np.float32)
    v = rng.normal(size=(batch, kv_heads, slots, head_dim)).astype(np.float32)
    key_slots, query_slots = np.arange(slots), slots - time + np.arange(time)
    pad = np.array([0, 4] + [1] * (batch - 2))[:batch]
    mask = (key_slots[None, None, :] <= query_slots[None, :, None]) & (key_slots[None, None, :] >= pad[:, None, None])
    if window is not None:
        mask &= (query_slots[:, None] - key_slots[None, :] < window)[None]
    mask[1, :3] = False
    assert not mask[1, 0].any() and mask[0].any(-1).all()
    return q, k, v, mask


CASES = [
    dict(softcap=None, block_q=4, block_k=5, window=None),
    dict(softcap=2.0, block_q=8, block_k=3, window=6),
    dict(softcap=None, block_q=7, block_k=7, window=3),
    dict(softcap=1.5, block_q=64, block_k=64, window=None),  # one block each way
]


@pytest.mark.parametrize("case", CASES)
def test_values_match_numpy_oracle(case):
    q, k, v, mask = inputs(0, window=case["window"])
    got = blockwise_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                              softcap=case["softcap"], block_q=case["block_q"], block_k=case["block_k"])
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, mask, case["softcap"]), atol=2e-6, rtol=0)
    # Rows that see no key average all values, as the plain softmax over MIN scores does.
    np.testing.assert_allclose(np.asarray(got)[1, :, :, 0], np.broadcast_to(v[1].mean(1)[:, None], (2, 2, 8)),
                               atol=2e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_plain_attention(case):
    q, k, v, mask = map(jnp.asarray, inputs(1, window=case["window"]))
    upstream = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))
    blockwise = lambda q, k, v: jnp.sum(upstream * blockwise_attention(
        q, k, v, mask, softcap=case["softcap"], block_q=case["block_q"], block_k=case["block_k"]))
    plain = lambda q, k, v: jnp.sum(upstream * plain_attention(q, k, v, mask, case["softcap"]))
    got = jax.jit(jax.grad(blockwise, argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(plain, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        assert float(jnp.abs(b).max()) > 0.1, name  # not a comparison of zeros
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_no_block_sized_scores_outlive_a_block():
    """The compiled value-and-gradient holds no `[.., T, S]` float32 array: its temporaries stay
    far below one full score tensor, where the plain path's exceed several."""
    batch, kv_heads, groups, length, head_dim = 1, 2, 2, 1024, 16
    q = jax.ShapeDtypeStruct((batch, kv_heads, groups, length, head_dim), jnp.float32)
    k = jax.ShapeDtypeStruct((batch, kv_heads, head_dim, length), jnp.float32)
    v = jax.ShapeDtypeStruct((batch, kv_heads, length, head_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length, length), jnp.bool_)
    scores_bytes = batch * kv_heads * groups * length * length * 4  # 16 MB

    def temp_bytes(attention):
        loss = lambda q, k, v, mask: jnp.sum(attention(q, k, v, mask))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blockwise = temp_bytes(lambda q, k, v, m: blockwise_attention(q, k, v, m, block_q=128, block_k=128))
    plain = temp_bytes(lambda q, k, v, m: plain_attention(q, k, v, m, None))
    assert plain > 2 * scores_bytes
    assert blockwise < scores_bytes / 2


def test_bad_shapes_are_refused():
    q, k, v, mask = map(jnp.asarray, inputs(3))
    with pytest.raises(ValueError, match="mask"):
        blockwise_attention(q, k, v, mask[:, :-1])
    with pytest.raises(ValueError, match=r"k \[B, K, Dh, S\]"):
        blockwise_attention(q, jnp.swapaxes(k, 2, 3), v, mask)
    with pytest.raises(ValueError, match="block sizes"):
        blockwise_attention(q, k, v, mask, block_q=0)


def test_bfloat16_inputs_keep_float32_statistics():
    """bfloat16 q, k, v: a bfloat16 output within bfloat16 rounding of the float64 oracle."""
    q, k, v, mask = inputs(4, window=5)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    got = blockwise_attention(bf16(q), bf16(k), bf16(v), jnp.asarray(mask), softcap=2.0, block_q=8, block_k=8)
    assert got.dtype == jnp.bfloat16
    expected = numpy_attention(*(np.asarray(bf16(x), np.float32) for x in (q, k, v)), mask, 2.0)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=3e-2)
    grads = jax.grad(lambda q: jnp.sum(blockwise_attention(q, bf16(k), bf16(v), jnp.asarray(mask)).astype(jnp.float32)))(bf16(q))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def numpy_logsumexp(q, k, mask, softcap):
    """float64 log sum_j exp(cap(q k)_j masked to MIN) per query row [B, K, G, T]."""
    scores = np.einsum("bkgqd,bkds->bkgqs", np.asarray(q, np.float64), np.asarray(k, np.float64))
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.asarray(mask)[:, None, None], scores, MIN)
    top = scores.max(-1, keepdims=True)
    return (top + np.log(np.exp(scores - top).sum(-1, keepdims=True)))[..., 0]


@pytest.mark.parametrize("case", CASES[:2])
def test_log_sum_exp_values_and_gradients(case):
    """`blockwise_attention_with_lse`: the output of `blockwise_attention` and each row's
    log-sum-exp (float64 NumPy oracle; MIN + log S, i.e. MIN, for rows that see no key), and the
    gradient of a loss on both against jax.grad of a plain jnp softmax and logsumexp."""
    q, k, v, mask = inputs(5, window=case["window"])
    blocks = dict(softcap=case["softcap"], block_q=case["block_q"], block_k=case["block_k"])
    out, lse = blockwise_attention_with_lse(*map(jnp.asarray, (q, k, v, mask)), **blocks)
    assert lse.shape == q.shape[:4] and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, mask, case["softcap"]), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(lse), numpy_logsumexp(q, k, mask, case["softcap"]), atol=2e-5, rtol=1e-6)
    assert np.all(np.asarray(lse)[1, :, :, 0] == MIN)

    q, k, v, mask = map(jnp.asarray, (q, k, v, mask))
    rng = np.random.default_rng(6)
    upstream = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    lse_upstream = jnp.asarray(rng.normal(size=q.shape[:4]).astype(np.float32))

    def plain_logsumexp(q, k):
        scores = jnp.einsum("bkgqd,bkds->bkgqs", q, k)
        if case["softcap"] is not None:
            scores = case["softcap"] * jnp.tanh(scores / case["softcap"])
        return jax.nn.logsumexp(jnp.where(mask[:, None, None], scores, MIN), axis=-1)

    def blockwise_loss(q, k, v):
        out, lse = blockwise_attention_with_lse(q, k, v, mask, **blocks)
        return jnp.sum(upstream * out) + jnp.sum(lse_upstream * lse)

    def plain_loss(q, k, v):
        out = plain_attention(q, k, v, mask, case["softcap"])
        return jnp.sum(upstream * out) + jnp.sum(lse_upstream * plain_logsumexp(q, k))

    got = jax.jit(jax.grad(blockwise_loss, argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(plain_loss, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")
    # The lse term alone: its gradient is nonzero and reaches q and k only.
    lse_only = lambda q, k: jnp.sum(lse_upstream * blockwise_attention_with_lse(q, k, v, mask, **blocks)[1])
    got = jax.jit(jax.grad(lse_only, argnums=(0, 1)))(q, k)
    expected = jax.grad(lambda q, k: jnp.sum(lse_upstream * plain_logsumexp(q, k)), argnums=(0, 1))(q, k)
    for name, a, b in zip("qk", got, expected):
        assert float(jnp.abs(b).max()) > 0.1, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name} (lse)")
