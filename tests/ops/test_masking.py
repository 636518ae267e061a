import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax.ops.masking import last_token_index, masked_mean, masked_sum, masked_var, masked_whiten


def counted_entries(x, mask):
    return np.asarray(x, np.float64)[np.asarray(mask).astype(bool)]


def oracle_mean(x, mask):
    values = counted_entries(x, mask)
    return values.mean() if values.size else 0.0


def oracle_var(x, mask, unbiased):
    values = counted_entries(x, mask)
    if values.size == 0:
        return 0.0
    if unbiased and values.size > 1:
        return values.var(ddof=1)
    return values.var()


def oracle_whiten(x, mask, shift_mean, eps):
    x = np.asarray(x, np.float64)
    mean = oracle_mean(x, mask)
    out = (x - mean) / np.sqrt(oracle_var(x, mask, unbiased=True) + eps)
    if not shift_mean:
        out = out + mean
    return out * np.asarray(mask, np.float64)


def oracle_last_index(mask):
    mask = np.asarray(mask).astype(bool)
    out = np.zeros(mask.shape[0], np.int64)
    for b, row in enumerate(mask):
        nonzero = np.flatnonzero(row)
        out[b] = nonzero[-1] if nonzero.size else 0
    return out


def padded_batch(seed, batch=6, time=10, left=False):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(batch, time)) * 2.3 + 0.7).astype(np.float32)
    lengths = rng.integers(0, time + 1, size=batch)
    lengths[0], lengths[1] = time, 0
    positions = np.arange(time)[None, :]
    if left:
        mask = positions >= (time - lengths)[:, None]
    else:
        mask = positions < lengths[:, None]
    return x, mask


@pytest.mark.parametrize("mask_dtype", [bool, np.float32, np.int32])
def test_masked_sum_and_mean_match_oracle(mask_dtype):
    x, mask = padded_batch(seed=0)
    mask = mask.astype(mask_dtype)
    np.testing.assert_allclose(masked_sum(x, mask), counted_entries(x, mask).sum(), rtol=1e-5)
    np.testing.assert_allclose(masked_mean(x, mask), oracle_mean(x, mask), rtol=1e-5)
    row_means = [oracle_mean(x[b:b + 1], mask[b:b + 1]) for b in range(x.shape[0])]
    row_sums = [counted_entries(x[b:b + 1], mask[b:b + 1]).sum() for b in range(x.shape[0])]
    np.testing.assert_allclose(masked_mean(x, mask, axis=1), row_means, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(masked_sum(x, mask, axis=1), row_sums, rtol=1e-5, atol=1e-6)
    assert masked_mean(x, mask, axis=1)[1] == 0.0  # empty row: guarded, not NaN
    column_means = [oracle_mean(x[:, t], mask[:, t]) for t in range(x.shape[1])]
    np.testing.assert_allclose(masked_mean(x, mask, axis=0), column_means, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_matches_oracle(unbiased):
    for seed in range(3):
        x, mask = padded_batch(seed)
        np.testing.assert_allclose(masked_var(x, mask, unbiased=unbiased), oracle_var(x, mask, unbiased), rtol=1e-5)
    one = np.zeros((2, 3), bool)
    one[0, 1] = True
    assert masked_var(np.ones((2, 3), np.float32) * 5, one, unbiased=unbiased) == 0.0
    assert masked_var(np.ones((2, 3), np.float32), np.zeros((2, 3)), unbiased=unbiased) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("eps", [1e-8, 0.3])
def test_masked_whiten_matches_oracle(shift_mean, eps):
    x, mask = padded_batch(seed=4)
    got = masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    np.testing.assert_allclose(got, oracle_whiten(x, mask, shift_mean, eps), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[~mask] == 0.0)
    if shift_mean and eps == 1e-8:
        counted = np.asarray(got)[mask]
        np.testing.assert_allclose(counted.mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(counted.std(ddof=1), 1.0, rtol=1e-4)


def test_masked_whiten_ignores_padding_values():
    x, mask = padded_batch(seed=5)
    garbage = np.where(mask, x, 1e4).astype(np.float32)
    np.testing.assert_allclose(masked_whiten(garbage, mask), masked_whiten(x, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("left", [False, True])
def test_last_token_index_matches_oracle(left):
    for seed in range(3):
        _, mask = padded_batch(seed, left=left)
        got = last_token_index(mask)
        np.testing.assert_array_equal(got, oracle_last_index(mask))
        np.testing.assert_array_equal(last_token_index(mask.astype(np.float32)), oracle_last_index(mask))
    holes = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], np.float32)
    np.testing.assert_array_equal(last_token_index(holes), [2, 0, 4])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), left=st.booleans())
def test_masked_mean_property_equals_oracle(seed, left):
    x, mask = padded_batch(seed, left=left)
    np.testing.assert_allclose(masked_mean(x, mask), oracle_mean(x, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(last_token_index(mask), oracle_last_index(mask))


def test_jit_vmap_grad():
    x, mask = padded_batch(seed=6)
    mask = mask.astype(np.float32)
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        np.testing.assert_allclose(jax.jit(fn)(x, mask), fn(x, mask), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(last_token_index)(mask), last_token_index(mask))
    per_row = jax.vmap(masked_mean)(x, mask)
    np.testing.assert_allclose(per_row, masked_mean(x, mask, axis=1), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(masked_mean))(x, mask)
    count = mask.sum()
    np.testing.assert_allclose(grad, mask / count, rtol=1e-6)
    grad = jax.jit(jax.grad(lambda v: masked_whiten(v, mask).sum() ** 2))(x)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_bad_shapes_raise():
    x, mask = padded_batch(seed=7)
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError, match="`mask` has shape"):
            fn(x, mask[:, :-1])
    with pytest.raises(ValueError, match="`mask` must have rank 2"):
        last_token_index(mask[0])
