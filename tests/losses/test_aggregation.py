import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.aggregation import AGGREGATION_MODES, aggregate

B, T = 5, 7


def right_padded_mask(rng, batch=B, time=T, min_len=0):
    lengths = rng.integers(min_len, time + 1, size=batch)
    return (np.arange(time)[None, :] < lengths[:, None]).astype(np.float32)


def np_aggregate(x, mask, mode, max_len=None, global_count=None):
    """Oracle written row by row from docs/numerics.md."""
    batch, time = x.shape
    row_sums = [sum(x[b, t] for t in range(time) if mask[b, t]) for b in range(batch)]
    row_counts = [int(mask[b].sum()) for b in range(batch)]
    total, count = sum(row_sums), sum(row_counts)
    if mode in ("token_mean", "bnpo"):
        return total / max(count, 1)
    if mode in ("sequence_mean", "grpo"):
        return np.mean([s / max(c, 1) for s, c in zip(row_sums, row_counts)])
    if mode == "sequence_sum":
        return np.mean(row_sums)
    if mode == "dr_grpo":
        return total / (batch * (time if max_len is None else max_len))
    if mode == "dapo":
        return total / max(count if global_count is None else global_count, 1)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_oracle(mode, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng)
    got = aggregate(jnp.asarray(x), jnp.asarray(mask), mode)
    np.testing.assert_allclose(got, np_aggregate(x, mask, mode), rtol=1e-5, atol=1e-6)
    assert got.dtype == jnp.float32 and got.shape == ()


def test_modes_differ_on_unequal_lengths():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    mask = jnp.asarray(right_padded_mask(rng, min_len=1))
    values = {m: float(aggregate(x, mask, m)) for m in ("token_mean", "sequence_mean", "sequence_sum", "dr_grpo")}
    assert len({round(v, 5) for v in values.values()}) == 4


def test_aliases():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    mask = jnp.asarray(right_padded_mask(rng))
    assert aggregate(x, mask, "bnpo") == aggregate(x, mask, "token_mean")
    assert aggregate(x, mask, "grpo") == aggregate(x, mask, "sequence_mean")
    assert aggregate(x, mask, "dapo") == aggregate(x, mask, "token_mean")


def test_dr_grpo_max_len_and_dapo_global_count():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng)
    got = aggregate(jnp.asarray(x), jnp.asarray(mask), "dr_grpo", max_len=16)
    np.testing.assert_allclose(got, np_aggregate(x, mask, "dr_grpo", max_len=16), rtol=1e-5)
    got = aggregate(jnp.asarray(x), jnp.asarray(mask), "dapo", global_token_count=40)
    np.testing.assert_allclose(got, np_aggregate(x, mask, "dapo", global_count=40), rtol=1e-5)


def test_dapo_microbatches_sum_to_global_token_mean():
    """Summing `dapo` losses of microbatches normalised by the global count = full token mean."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(4, 2, T)).astype(np.float32))
    mask = jnp.asarray(right_padded_mask(rng, batch=8).reshape(4, 2, T))

    def per_microbatch(x_mb, mask_mb):
        global_count = jax.lax.psum(jnp.sum(mask_mb), "micro")
        return aggregate(x_mb, mask_mb, "dapo", global_token_count=global_count)

    losses = jax.vmap(per_microbatch, axis_name="micro")(x, mask)
    full = aggregate(x.reshape(8, T), mask.reshape(8, T), "token_mean")
    np.testing.assert_allclose(jnp.sum(losses), full, rtol=1e-5)


def test_padding_values_are_ignored_even_if_nan():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng)
    dirty = np.where(mask > 0, x, np.nan).astype(np.float32)
    for mode in AGGREGATION_MODES:
        np.testing.assert_allclose(
            aggregate(jnp.asarray(dirty), jnp.asarray(mask), mode),
            aggregate(jnp.asarray(x), jnp.asarray(mask), mode),
        )


def test_empty_mask_gives_zero():
    x = jnp.ones((B, T))
    for mode in AGGREGATION_MODES:
        assert float(aggregate(x, jnp.zeros((B, T)), mode)) == 0.0


def test_bool_mask_equals_float_mask():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    mask = right_padded_mask(rng)
    for mode in AGGREGATION_MODES:
        assert aggregate(x, jnp.asarray(mask > 0), mode) == aggregate(x, jnp.asarray(mask), mode)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_jit_matches_eager_and_gradient_oracle(mode):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask(rng, min_len=1)
    eager = aggregate(jnp.asarray(x), jnp.asarray(mask), mode)
    jitted = jax.jit(functools.partial(aggregate, mode=mode))(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    grad = jax.grad(aggregate)(jnp.asarray(x), jnp.asarray(mask), mode)
    counts = mask.sum(axis=1, keepdims=True)
    expected = {
        "token_mean": mask / mask.sum(),
        "bnpo": mask / mask.sum(),
        "dapo": mask / mask.sum(),
        "sequence_mean": mask / counts / B,
        "grpo": mask / counts / B,
        "sequence_sum": mask / B,
        "dr_grpo": mask / (B * T),
    }[mode]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    constant=st.floats(-5, 5),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["token_mean", "sequence_mean", "dapo"]),
)
def test_constant_per_token_value_is_recovered(constant, seed, mode):
    """Every mean-type mode returns c for a constant input when every row has a token."""
    rng = np.random.default_rng(seed)
    mask = jnp.asarray(right_padded_mask(rng, min_len=1))
    got = aggregate(jnp.full((B, T), constant, jnp.float32), mask, mode)
    np.testing.assert_allclose(got, constant, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    x = jnp.ones((B, T))
    with pytest.raises(ValueError, match="mode"):
        aggregate(x, x, "mean_of_means")
    with pytest.raises(ValueError, match="per_token"):
        aggregate(jnp.ones((T,)), jnp.ones((T,)))
    with pytest.raises(ValueError, match="mask"):
        aggregate(x, jnp.ones((B, T + 1)))
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, x, "dr_grpo", max_len=0)
    with pytest.raises(ValueError, match="global_token_count"):
        aggregate(x, x, "dapo", global_token_count=jnp.ones((2,)))
