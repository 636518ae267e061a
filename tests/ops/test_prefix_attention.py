"""Prefix attention (N continuations sharing one prefix's keys and values) against a float64
NumPy oracle of attention over each continuation's concatenated keys (values), and against
autodiff of a plain jnp softmax attention over the prefix repeated N times (gradients), on
left-padded prefixes, right-padded continuations, windows, soft-capping and grouped heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops.prefix_attention import prefix_attention

MIN = np.finfo(np.float32).min
BATCH, KV_HEADS, NUM, GROUPS, PREFIX, OWN, HEAD_DIM = 2, 2, 3, 2, 9, 6, 8


def inputs(seed, window=None, queries=None):
    """Random q (at `queries` of the OWN continuation tokens, default all), k, v, prefix
    keys/values and the mask of a causal pass over left-padded prefixes (row 1: 4 pad slots)
    and right-padded continuations (continuation 1 has 4 tokens, 2 has 2), optionally
    windowed by position; the queries of row 1 continuation 2 see no key at all."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    rows = np.arange(OWN) if queries is None else np.asarray(queries)
    q = normal(BATCH, KV_HEADS, NUM, GROUPS, len(rows), HEAD_DIM)
    k, v = normal(BATCH, KV_HEADS, NUM, HEAD_DIM, OWN), normal(BATCH, KV_HEADS, NUM, OWN, HEAD_DIM)
    prefix_k, prefix_v = normal(BATCH, KV_HEADS, HEAD_DIM, PREFIX), normal(BATCH, KV_HEADS, PREFIX, HEAD_DIM)
    prefix_real = np.ones((BATCH, PREFIX), bool)
    prefix_real[1, :4] = False
    own_real = np.ones((NUM, OWN), bool)
    own_real[1, 4:] = False
    own_real[2, 2:] = False
    key_real = np.concatenate([np.broadcast_to(prefix_real[:, None], (BATCH, NUM, PREFIX)),
                               np.broadcast_to(own_real[None], (BATCH, NUM, OWN))], axis=-1)  # [B, N, S + U]
    slots = np.arange(PREFIX + OWN)
    causal = slots[None, :] <= (PREFIX + rows)[:, None]  # [T, S + U]
    mask = causal[None, None] & key_real[:, :, None, :]
    if window is not None:  # positions count real tokens
        positions = np.cumsum(key_real, axis=-1) - 1  # [B, N, S + U]
        distance = positions[:, :, PREFIX + rows][..., None] - positions[:, :, None, :]
        mask &= distance < window
    mask[1, 2] = False
    return q, k, v, prefix_k, prefix_v, mask


def repeated(k, v, prefix_k, prefix_v):
    """Each continuation's keys [B, K, N, Dh, S + U] and values [B, K, N, S + U, Dh]: the prefix
    repeated N times, then the continuation's own."""
    keys = np.concatenate([np.repeat(prefix_k[:, :, None], NUM, 2), k], axis=-1)
    values = np.concatenate([np.repeat(prefix_v[:, :, None], NUM, 2), v], axis=-2)
    return keys, values


def numpy_attention(q, k, v, prefix_k, prefix_v, mask, softcap):
    """float64 softmax(cap(q [K_b, k_bn]) masked to MIN) [V_b; v_bn] for every continuation."""
    keys, values = (np.asarray(x, np.float64) for x in repeated(k, v, prefix_k, prefix_v))
    scores = np.einsum("bkngtd,bknds->bkngts", np.asarray(q, np.float64), keys)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.asarray(mask)[:, None, :, None], scores, MIN)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bkngts,bknsd->bkngtd", weights, values)


def plain_attention(q, k, v, prefix_k, prefix_v, mask, softcap):
    """jnp attention over the prefix repeated N times (the layout that copies it)."""
    num = q.shape[2]
    keys = jnp.concatenate([jnp.repeat(prefix_k[:, :, None], num, 2), k], axis=-1)
    values = jnp.concatenate([jnp.repeat(prefix_v[:, :, None], num, 2), v], axis=-2)
    scores = jnp.einsum("bkngtd,bknds->bkngts", q, keys)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, :, None], scores, MIN)
    return jnp.einsum("bkngts,bknsd->bkngtd", jax.nn.softmax(scores, -1), values)


CASES = [dict(softcap=None, window=None, queries=None), dict(softcap=2.0, window=5, queries=None),
         dict(softcap=None, window=3, queries=[5, 1]), dict(softcap=1.5, window=None, queries=[3])]


@pytest.mark.parametrize("case", CASES)
def test_values_match_numpy_oracle(case):
    arrays = inputs(0, case["window"], case["queries"])
    got = jax.jit(lambda *a: prefix_attention(*a, softcap=case["softcap"]))(*map(jnp.asarray, arrays))
    assert got.shape == arrays[0].shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_attention(*arrays, case["softcap"]), atol=2e-6, rtol=0)
    # Queries that see no key average all S + U values, as the plain softmax over MIN does.
    _, _, v, _, prefix_v, _ = arrays
    average = np.concatenate([prefix_v[1], v[1, :, 2]], axis=1).mean(1)  # [K, Dh]
    no_key = np.asarray(got)[1, :, 2]  # [K, G, T, Dh]
    np.testing.assert_allclose(no_key, np.broadcast_to(average[:, None, None], no_key.shape), atol=2e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_attention_over_the_repeated_prefix(case):
    arrays = tuple(map(jnp.asarray, inputs(1, case["window"], case["queries"])))
    mask = arrays[-1]
    upstream = jnp.asarray(np.random.default_rng(2).normal(size=arrays[0].shape).astype(np.float32))
    shared = lambda *a: jnp.sum(upstream * prefix_attention(*a, mask, softcap=case["softcap"]))
    plain = lambda *a: jnp.sum(upstream * plain_attention(*a, mask, case["softcap"]))
    got = jax.jit(jax.grad(shared, argnums=range(5)))(*arrays[:5])
    expected = jax.grad(plain, argnums=range(5))(*arrays[:5])
    for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], got, expected):
        assert float(jnp.abs(b).max()) > 0.1, name  # not a comparison of zeros
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_no_copy_of_the_prefix_per_continuation():
    """The compiled value-and-gradient never holds the prefix's keys or values once per
    continuation: its temporaries stay below one such copy, where attention over the repeated
    prefix needs several."""
    batch, kv_heads, num, groups, prefix, own, head_dim = 1, 2, 16, 1, 2048, 1, 64
    shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)
    args = (shape(batch, kv_heads, num, groups, own, head_dim), shape(batch, kv_heads, num, head_dim, own),
            shape(batch, kv_heads, num, own, head_dim), shape(batch, kv_heads, head_dim, prefix),
            shape(batch, kv_heads, prefix, head_dim), shape(batch, num, own, prefix + own, dtype=jnp.bool_))
    copy_bytes = batch * num * kv_heads * prefix * head_dim * 4  # 16 MB

    def temp_bytes(attention):
        loss = lambda *a: jnp.sum(attention(*a))
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(lambda *a: plain_attention(*a, None)) > 2 * copy_bytes
    assert temp_bytes(lambda *a: prefix_attention(*a)) < copy_bytes / 2


def test_bad_shapes_are_refused():
    q, k, v, prefix_k, prefix_v, mask = map(jnp.asarray, inputs(3))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        prefix_attention(q, k, v, prefix_k, prefix_v, mask[..., :-1])
    with pytest.raises(ValueError, match="`prefix_k` must have shape"):
        prefix_attention(q, k, v, jnp.swapaxes(prefix_k, 2, 3), prefix_v, mask)


def test_bfloat16_inputs_keep_float32_statistics():
    """bfloat16 inputs: a bfloat16 output within bfloat16 rounding of the float64 oracle, and
    finite bfloat16 gradients."""
    arrays = inputs(4, window=4)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    got = prefix_attention(*map(bf16, arrays[:5]), jnp.asarray(arrays[5]), softcap=2.0)
    assert got.dtype == jnp.bfloat16
    rounded = [np.asarray(bf16(x), np.float32) for x in arrays[:5]]
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_attention(*rounded, arrays[5], 2.0), atol=3e-2)
    loss = lambda q: jnp.sum(prefix_attention(q, *map(bf16, arrays[1:5]), jnp.asarray(arrays[5])).astype(jnp.float32))
    grads = jax.grad(loss)(bf16(arrays[0]))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))
