"""Blockwise shared-prefix attention (two blockwise attentions merged through their rows'
log-sum-exps) against a float64 NumPy softmax over each continuation's concatenated keys
(values) and against autodiff of a plain jnp softmax over the prefix repeated N times
(gradients), with block sizes that leave several ragged blocks: left-padded prefixes,
right-padded continuations, windows, rows that see only the prefix, only their own keys or
nothing at all, soft-capping and grouped heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_attention_cases import no_key_average, numpy_prefix_attention, prefix_inputs, repeated_prefix_attention

from rlhf_jax.ops.blockwise_prefix_attention import blockwise_prefix_attention

PREFIX, OWN = 11, 7


def inputs(seed, window=None, queries=None):
    """Continuations of 7, 5 and 2 real tokens after 11 prefix slots, one row split between
    prefix-only and own-only queries (prefix_attention_cases.prefix_inputs)."""
    return prefix_inputs(seed, prefix=PREFIX, own=OWN, own_lengths=[7, 5, 2], window=window, queries=queries,
                         split_row=True)


CASES = [
    dict(softcap=None, window=None, queries=None, block_q=2, block_k=4),
    dict(softcap=2.0, window=5, queries=None, block_q=3, block_k=3),
    dict(softcap=None, window=3, queries=[1, 6, 4], block_q=4, block_k=5),
    dict(softcap=1.5, window=None, queries=None, block_q=64, block_k=64),  # one block each way
]


def attention(case):
    return lambda *a: blockwise_prefix_attention(*a, softcap=case["softcap"], block_q=case["block_q"],
                                                 block_k=case["block_k"])


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_attention_over_the_repeated_prefix(case):
    """Values against the float64 oracle; gradients of every input against autodiff of the
    copying layout (one compiled value-and-gradient per case)."""
    arrays = inputs(0, case["window"], case["queries"])
    q, k, v, prefix_k, prefix_v, mask = map(jnp.asarray, arrays)
    upstream = jnp.asarray(np.random.default_rng(2).normal(size=q.shape).astype(np.float32))

    def blockwise(*a):
        out = attention(case)(*a, mask)
        return jnp.sum(upstream * out), out

    grads, got = jax.jit(jax.grad(blockwise, argnums=range(5), has_aux=True))(q, k, v, prefix_k, prefix_v)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_prefix_attention(*arrays, case["softcap"]), atol=2e-6, rtol=0)
    average = no_key_average(arrays)
    no_key = np.asarray(got)[1, :, 2]  # [K, G, T, Dh]
    np.testing.assert_allclose(no_key, np.broadcast_to(average[:, None, None], no_key.shape), atol=2e-6)

    plain = lambda *a: jnp.sum(upstream * repeated_prefix_attention(*a, mask, case["softcap"]))
    expected = jax.grad(plain, argnums=range(5))(q, k, v, prefix_k, prefix_v)
    for name, a, b in zip(["q", "k", "v", "prefix_k", "prefix_v"], grads, expected):
        assert float(jnp.abs(b).max()) > 0.1, name  # not a comparison of zeros
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_no_copy_of_the_prefix_per_continuation():
    """The compiled value-and-gradient never holds the prefix's keys or values once per
    continuation: its temporaries stay below one such copy, where blockwise attention over
    the repeated prefix (the layout it replaces) needs several."""
    from rlhf_jax.ops.blockwise_attention import blockwise_attention

    batch, kv_heads, num, groups, prefix, own, head_dim = 1, 2, 16, 1, 2048, 8, 64
    shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)
    args = (shape(batch, kv_heads, num, groups, own, head_dim), shape(batch, kv_heads, num, head_dim, own),
            shape(batch, kv_heads, num, own, head_dim), shape(batch, kv_heads, head_dim, prefix),
            shape(batch, kv_heads, prefix, head_dim), shape(batch, num, own, prefix + own, dtype=jnp.bool_))
    copy_bytes = batch * num * kv_heads * prefix * head_dim * 4  # 16 MB

    def copying(q, k, v, prefix_k, prefix_v, mask):
        rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(batch * num, kv_heads, *x.shape[3:])
        keys = jnp.concatenate([jnp.repeat(prefix_k, num, 0), rows(k)], axis=-1)
        values = jnp.concatenate([jnp.repeat(prefix_v, num, 0), rows(v)], axis=-2)
        return blockwise_attention(rows(q), keys, values, mask.reshape(batch * num, own, -1), block_q=256, block_k=256)

    def temp_bytes(attention):
        loss = lambda *a: jnp.sum(attention(*a))
        compiled = jax.jit(jax.grad(loss, argnums=range(5))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(copying) > 2 * copy_bytes
    assert temp_bytes(lambda *a: blockwise_prefix_attention(*a, block_q=256, block_k=256)) < copy_bytes / 2


def test_bad_shapes_are_refused():
    q, k, v, prefix_k, prefix_v, mask = map(jnp.asarray, inputs(3))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        blockwise_prefix_attention(q, k, v, prefix_k, prefix_v, mask[..., :-1])
    with pytest.raises(ValueError, match="`prefix_v` must have shape"):
        blockwise_prefix_attention(q, k, v, prefix_k, jnp.swapaxes(prefix_v, 2, 3), mask)


def test_bfloat16_inputs_keep_float32_statistics():
    """bfloat16 inputs: a bfloat16 output within bfloat16 rounding of the float64 oracle, and
    finite bfloat16 gradients."""
    arrays = inputs(4, window=4)
    bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    mask = jnp.asarray(arrays[5])

    def loss(q, *rest):
        out = blockwise_prefix_attention(q, *rest, mask, softcap=2.0, block_q=4, block_k=4)
        return jnp.sum(out.astype(jnp.float32)), out

    grads, got = jax.jit(jax.grad(loss, has_aux=True))(*map(bf16, arrays[:5]))
    assert got.dtype == jnp.bfloat16 and grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))
    rounded = [np.asarray(bf16(x), np.float32) for x in arrays[:5]]
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_prefix_attention(*rounded, arrays[5], 2.0), atol=3e-2)
