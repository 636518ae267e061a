"""The linear layer folds leading axes into one matmul: same numbers as a NumPy product."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.models.layers import Dense, fold_matmul


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 5), (2, 1, 3, 5)])
def test_dense_matches_numpy_on_any_leading_axes(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    layer = Dense(features=4, use_bias=True)
    params = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert params["kernel"].shape == (5, 4) and params["bias"].shape == (4,)
    params = {"kernel": rng.normal(size=(5, 4)).astype(np.float32), "bias": rng.normal(size=4).astype(np.float32)}
    y = layer.apply({"params": params}, jnp.asarray(x))
    expected = x @ params["kernel"] + params["bias"]
    assert y.shape == shape[:-1] + (4,)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_dense_gradients_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    kernel = rng.normal(size=(5, 4)).astype(np.float32)
    upstream = rng.normal(size=(2, 3, 4)).astype(np.float32)
    layer = Dense(features=4, use_bias=False)

    def loss(kernel, x):
        return jnp.sum(layer.apply({"params": {"kernel": kernel}}, x) * upstream)

    grad_kernel, grad_x = jax.grad(loss, argnums=(0, 1))(jnp.asarray(kernel), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad_kernel), np.einsum("btd,btf->df", x, upstream), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_x), upstream @ kernel.T, rtol=1e-5, atol=1e-5)


def test_fold_matmul_transposed_kernel_and_accumulation_dtype():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    embedding = rng.normal(size=(7, 5)).astype(np.float32)  # [V, D], as tied embeddings
    y = fold_matmul(jnp.asarray(x, jnp.bfloat16), jnp.asarray(embedding, jnp.bfloat16),
                    transpose_kernel=True, accumulate=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (2, 3, 7)
    np.testing.assert_allclose(np.asarray(y), x @ embedding.T, rtol=3e-2, atol=3e-2)
