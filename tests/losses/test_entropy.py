import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.entropy import entropy_loss

B, T, V = 4, 6, 11


def right_padded_mask(rng, min_len=1):
    lengths = rng.integers(min_len, T + 1, size=B)
    return (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)


def np_entropy(logits, temperature):
    z = logits.astype(np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1)


def make_batch(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * 2.0).astype(np.float32)
    return logits, right_padded_mask(rng)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "sequence_sum"])
def test_matches_oracle(temperature, mode):
    logits, mask = make_batch(0)
    loss, metrics = entropy_loss(jnp.asarray(logits), jnp.asarray(mask), temperature=temperature, aggregation=mode)
    entropy = np_entropy(logits, temperature)
    if mode == "token_mean":
        expected = (entropy * mask).sum() / mask.sum()
    elif mode == "sequence_mean":
        expected = np.mean((entropy * mask).sum(1) / mask.sum(1))
    else:
        expected = np.mean((entropy * mask).sum(1))
    np.testing.assert_allclose(loss, -expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy/mean"], (entropy * mask).sum() / mask.sum(), rtol=1e-5)


def test_uniform_logits_give_log_vocab():
    loss, metrics = entropy_loss(jnp.zeros((B, T, V)), jnp.ones((B, T)))
    np.testing.assert_allclose(-loss, np.log(V), rtol=1e-6)
    np.testing.assert_allclose(metrics["entropy/mean"], np.log(V), rtol=1e-6)


def test_gradient_step_raises_entropy_and_ignores_padding():
    logits, mask = map(jnp.asarray, make_batch(1))
    fn = jax.jit(jax.value_and_grad(lambda x: entropy_loss(x, mask)[0]))
    loss, grad = fn(logits)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
    new_loss, _ = fn(logits - 0.5 * grad)
    assert float(new_loss) < float(loss)  # loss = -entropy went down, entropy went up


def test_jit_matches_eager_and_bf16_logits():
    logits, mask = map(jnp.asarray, make_batch(2))
    fn = functools.partial(entropy_loss, temperature=0.8, aggregation="grpo")
    eager, _ = fn(logits, mask)
    jitted, _ = jax.jit(fn)(logits, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    bf16_loss, metrics = fn(logits.astype(jnp.bfloat16), mask)
    assert bf16_loss.dtype == jnp.float32 and metrics["entropy/mean"].dtype == jnp.float32
    np.testing.assert_allclose(bf16_loss, eager, rtol=2e-2)


def test_bad_inputs_raise():
    logits, mask = map(jnp.asarray, make_batch(3))
    with pytest.raises(ValueError, match="mask"):
        entropy_loss(logits, mask[:, :-1])
    with pytest.raises(ValueError, match="logits"):
        entropy_loss(logits[0], mask)
    with pytest.raises(ValueError, match="aggregation"):
        entropy_loss(logits, mask, aggregation="max")
    with pytest.raises(ValueError, match="temperature"):
        entropy_loss(logits, mask, temperature=0.0)
