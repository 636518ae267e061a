import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rlhf_jax.losses.sft import sft_loss, sft_loss_from_logprobs

B, T, V = 4, 6, 13


def make_batch(seed):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * 3.0).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
    lengths = rng.integers(1, T + 1, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    # Make some predictions right so accuracy is strictly between 0 and 1.
    labels[:, 0] = logits[:, 0].argmax(-1)
    return logits, labels, mask


def np_log_softmax(logits):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_oracle(seed):
    logits, labels, mask = make_batch(seed)
    loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    log_probs = np_log_softmax(logits)
    counted = mask > 0
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0][counted]
    accuracy = (logits.argmax(-1) == labels)[counted].mean()
    np.testing.assert_allclose(loss, nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sft/loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sft/nll"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sft/accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(metrics["sft/perplexity"], np.exp(nll.mean()), rtol=1e-5)
    assert 0 < accuracy < 1


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_torch(label_smoothing):
    logits, labels, mask = make_batch(2)
    torch_labels = torch.tensor(np.where(mask > 0, labels, -100).astype(np.int64))
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, V), torch_labels.reshape(-1),
        ignore_index=-100, label_smoothing=label_smoothing,
    )
    loss, metrics = sft_loss(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), label_smoothing=label_smoothing
    )
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    plain = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, V), torch_labels.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(metrics["sft/nll"], plain.item(), rtol=1e-5)


def test_ignored_label_ids_at_padding_and_bf16_logits():
    logits, labels, mask = make_batch(3)
    dirty_labels = np.where(mask > 0, labels, -100).astype(np.int32)
    clean, clean_metrics = sft_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    dirty, dirty_metrics = sft_loss(jnp.asarray(logits), jnp.asarray(dirty_labels), jnp.asarray(mask))
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    for key in clean_metrics:
        np.testing.assert_allclose(dirty_metrics[key], clean_metrics[key], rtol=1e-6)
    bf16, _ = sft_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, clean, rtol=2e-2)


def test_gradient_is_softmax_minus_onehot():
    logits, labels, mask = make_batch(4)
    grad = jax.jit(jax.grad(lambda x: sft_loss(x, jnp.asarray(labels), jnp.asarray(mask))[0]))(jnp.asarray(logits))
    probs = np.exp(np_log_softmax(logits))
    onehot = np.eye(V)[labels]
    expected = (probs - onehot) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    # The label logit is pushed up on counted tokens.
    label_grad = np.take_along_axis(np.asarray(grad), labels[..., None], -1)[..., 0]
    assert np.all(label_grad[mask > 0] < 0) and np.all(label_grad[mask == 0] == 0)


def test_jit_matches_eager():
    logits, labels, mask = map(jnp.asarray, make_batch(5))
    fn = functools.partial(sft_loss, label_smoothing=0.1)
    eager, eager_metrics = fn(logits, labels, mask)
    jitted, jit_metrics = jax.jit(fn)(logits, labels, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6)


def test_bad_inputs_raise():
    logits, labels, mask = map(jnp.asarray, make_batch(6))
    with pytest.raises(ValueError, match="labels"):
        sft_loss(logits, labels[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        sft_loss(logits, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        sft_loss(logits, labels.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="logits"):
        sft_loss(logits[0], labels, mask)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(logits, labels, mask, label_smoothing=1.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_from_logprobs_matches_torch_from_statistics(label_smoothing):
    """The loss from per-token statistics (as a chunked head returns them) is torch's loss."""
    logits, labels, mask = make_batch(3)
    log_probs = np_log_softmax(logits)
    label_lp = np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    correct = (logits.argmax(-1) == labels).astype(np.float32)
    loss, metrics = sft_loss_from_logprobs(jnp.asarray(label_lp, jnp.float32), jnp.asarray(mask),
                                           mean_logprobs=jnp.asarray(log_probs.mean(-1), jnp.float32),
                                           correct=jnp.asarray(correct), label_smoothing=label_smoothing)
    counted = mask > 0
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits[counted]), torch.tensor(labels[counted]).long(),
                                                 label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["sft/accuracy"], correct[counted].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["sft/nll"], -label_lp[counted].mean(), rtol=1e-5)
    with pytest.raises(ValueError, match="mean_logprobs"):
        sft_loss_from_logprobs(jnp.asarray(label_lp), jnp.asarray(mask), label_smoothing=0.2)
