"""Prefix attention (N continuations sharing one prefix's keys and values) against a float64
NumPy oracle of attention over each continuation's concatenated keys (values), and against
autodiff of a plain jnp softmax attention over the prefix repeated N times (gradients), on
left-padded prefixes, right-padded continuations, windows, soft-capping and grouped heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prefix_attention_cases import no_key_average, numpy_prefix_attention, prefix_inputs, repeated_prefix_attention

from rlhf_jax.ops.prefix_attention import prefix_attention

PREFIX, OWN = 9, 6


def inputs(seed, window=None, queries=None):
    """Continuations of 6, 4 and 2 real tokens after 9 prefix slots
    (prefix_attention_cases.prefix_inputs)."""
    return prefix_inputs(seed, prefix=PREFIX, own=OWN, own_lengths=[6, 4, 2], window=window, queries=queries)


CASES = [dict(softcap=None, window=None, queries=None), dict(softcap=2.0, window=5, queries=None),
         dict(softcap=None, window=3, queries=[5, 1]), dict(softcap=1.5, window=None, queries=[3])]


@pytest.mark.parametrize("case", CASES)
def test_values_match_numpy_oracle(case):
    arrays = inputs(0, case["window"], case["queries"])
    got = jax.jit(lambda *a: prefix_attention(*a, softcap=case["softcap"]))(*map(jnp.asarray, arrays))
    assert got.shape == arrays[0].shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_prefix_attention(*arrays, case["softcap"]), atol=2e-6, rtol=0)
    average = no_key_average(arrays)
    no_key = np.asarray(got)[1, :, 2]  # [K, G, T, Dh]
    np.testing.assert_allclose(no_key, np.broadcast_to(average[:, None, None], no_key.shape), atol=2e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_attention_over_the_repeated_prefix(case):
    arrays = tuple(map(jnp.asarray, inputs(1, case["window"], case["queries"])))
    mask = arrays[-1]
    upstream = jnp.asarray(np.random.default_rng(2).normal(size=arrays[0].shape).astype(np.float32))
    shared = lambda *a: jnp.sum(upstream * prefix_attention(*a, mask, softcap=case["softcap"]))
    plain = lambda *a: jnp.sum(upstream * repeated_prefix_attention(*a, mask, case["softcap"]))
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

    assert temp_bytes(lambda *a: repeated_prefix_attention(*a, None)) > 2 * copy_bytes
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
    np.testing.assert_allclose(np.asarray(got, np.float32), numpy_prefix_attention(*rounded, arrays[5], 2.0), atol=3e-2)
    loss = lambda q: jnp.sum(prefix_attention(q, *map(bf16, arrays[1:5]), jnp.asarray(arrays[5])).astype(jnp.float32))
    grads = jax.grad(loss)(bf16(arrays[0]))
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))
