import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops.checks import (check_floating, check_in, check_left_padded, check_nonempty, check_positive,
                                 check_prompted_responses, check_rank, check_same_shape)


def test_check_rank_accepts_and_rejects():
    check_rank(np.zeros((2, 3)), 2, "x")
    check_rank(np.zeros((2,)), (1, 2), "x")
    with pytest.raises(ValueError, match=r"`logp` must have rank 2, got shape \(2,\)"):
        check_rank(np.zeros((2,)), 2, "logp")


def test_check_same_shape_names_both_arguments():
    check_same_shape(a=np.zeros((2, 3)), b=np.ones((2, 3)), c=None)
    with pytest.raises(ValueError, match=r"`mask` has shape \(2, 4\) but `logp` has shape \(2, 3\)"):
        check_same_shape(logp=np.zeros((2, 3)), mask=np.zeros((2, 4)))


def test_checks_are_static_under_jit():
    @jax.jit
    def f(x, mask):
        check_same_shape(x=x, mask=mask)
        check_floating(x, "x")
        return x * mask

    assert f(jnp.ones((2, 3)), jnp.ones((2, 3))).shape == (2, 3)
    with pytest.raises(ValueError, match="`mask` has shape"):
        f(jnp.ones((2, 3)), jnp.ones((3, 2)))


def test_check_floating_positive_and_in():
    with pytest.raises(ValueError, match="floating-point"):
        check_floating(np.zeros(3, dtype=np.int32), "tokens")
    check_positive(0.5, "beta")
    check_positive(jnp.float32(-1.0), "beta")  # traced or array values are not checked
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        check_positive(0.0, "beta")
    with pytest.raises(ValueError, match=r"`kind` must be one of \['k1', 'k2'\], got 'k9'"):
        check_in("k9", ("k1", "k2"), "kind")


def test_masked_reductions_ignore_nan_and_inf_in_padding():
    from rlhf_jax.ops.masking import masked_mean, masked_sum, masked_var, masked_whiten

    x = jnp.array([[1.0, 2.0, -jnp.inf], [3.0, jnp.nan, 0.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(masked_sum(x, mask)) == 6.0
    assert float(masked_mean(x, mask)) == 2.0
    np.testing.assert_allclose(float(masked_var(x, mask)), 1.0, rtol=1e-6)  # unbiased var of [1, 2, 3]
    whitened = masked_whiten(x, mask)
    assert bool(jnp.all(jnp.isfinite(whitened)))
    np.testing.assert_allclose(np.asarray(whitened)[mask == 0], 0.0)
    grads = jax.grad(lambda v: masked_mean(v, mask))(jnp.where(mask == 1, x, 0.0))
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_masked_mean_of_bfloat16_counts_in_float32():
    from rlhf_jax.ops.masking import masked_mean

    x = jnp.ones((1, 1000), jnp.bfloat16)
    assert masked_mean(x, jnp.ones((1, 1000))).dtype == jnp.float32
    assert float(masked_mean(x * 3, jnp.ones((1, 1000)))) == 3.0


def test_check_left_padded_accepts_left_padding_and_rows_of_batch_padding():
    check_left_padded(np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]), "prompt_mask")
    check_left_padded(np.array([[[0, 1], [1, 1]]], bool), "prompt_mask")  # any leading shape
    check_left_padded(np.ones((0, 4)), "prompt_mask")  # no rows


@pytest.mark.parametrize("row, where", [
    ([1, 1, 0, 0], r"row 1 ends in padding \(last column 0\)"),  # right-padded
    ([0, 1, 0, 1], "row 1 has padding at column 2 between real tokens"),
    ([1, 0, 0, 1], "row 1 has padding at column 1 between real tokens"),
])
def test_check_left_padded_names_the_first_bad_row_and_the_fix(row, where):
    mask = jnp.array([[0, 1, 1, 1], row, [1, 1, 1, 0]])
    with pytest.raises(ValueError, match=where) as error:
        check_left_padded(mask, "prompt_mask")
    assert "`prompt_mask` row 1" in str(error.value)
    assert 'tokenizer.padding_side = "left"' in str(error.value)


def test_check_left_padded_is_skipped_under_jit():
    @jax.jit
    def f(mask):
        check_left_padded(mask, "prompt_mask")
        return mask.sum()

    assert int(f(jnp.array([[1, 1, 0]]))) == 2
    with pytest.raises(ValueError, match="ends in padding"):
        check_left_padded(jnp.array([[1, 1, 0]]), "prompt_mask")


def test_check_prompted_responses_refuses_responses_after_an_empty_prompt():
    prompt_mask = np.array([[0, 1], [0, 0]])
    check_prompted_responses(prompt_mask, np.array([[[1, 0]], [[0, 0]]]))  # row 1: batch padding
    with pytest.raises(ValueError, match="`prompt_mask` row 1 is all 0 but `response_mask` marks real tokens"):
        check_prompted_responses(prompt_mask, np.array([[[1, 0]], [[1, 0]]]))
    check_prompted_responses(np.zeros((0, 2)), np.zeros((0, 1, 3)))


def test_check_nonempty_works_on_static_shapes_under_jit():
    check_nonempty(np.ones(2), "logps")
    with pytest.raises(ValueError, match=r"`logps` is empty \(shape \(0,\)\)"):
        jax.jit(lambda x: check_nonempty(x, "logps"))(jnp.ones(0))
