import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rlhf_jax.losses.sft import sft_loss, sft_loss_from_logprobs
from rlhf_jax.ops.logprobs import sequence_logprobs

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


def model_call(logits, labels, mask, seed=0):
    """The model's view of an aligned batch: `[B, T+1, V]` logits for `[B, T+1]` input_ids.

    `input_ids[:, 1:] = labels`, `logits[:, :-1]` = the aligned logits; the first token, the
    last logit row and `mask[:, 0]` are random, and must not matter.
    """
    rng = np.random.default_rng(seed + 100)
    first = rng.integers(0, V, size=(B, 1)).astype(labels.dtype)
    last = (rng.normal(size=(B, 1, V)) * 3.0).astype(logits.dtype)
    return (jnp.asarray(np.concatenate([logits, last], axis=1)),
            jnp.asarray(np.concatenate([first, labels], axis=1)),
            jnp.asarray(np.concatenate([rng.integers(0, 2, size=(B, 1)).astype(mask.dtype), mask], axis=1)))


def np_log_softmax(logits):
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_oracle(seed):
    logits, labels, mask = make_batch(seed)
    loss, metrics = sft_loss(*model_call(logits, labels, mask, seed))
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
    loss, metrics = sft_loss(*model_call(logits, labels, mask), label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-5)
    plain = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, V), torch_labels.reshape(-1), ignore_index=-100
    )
    np.testing.assert_allclose(metrics["sft/nll"], plain.item(), rtol=1e-5)


def test_ignored_label_ids_at_padding_and_bf16_logits():
    logits, labels, mask = make_batch(3)
    dirty_labels = np.where(mask > 0, labels, -100).astype(np.int32)
    clean, clean_metrics = sft_loss(*model_call(logits, labels, mask))
    dirty, dirty_metrics = sft_loss(*model_call(logits, dirty_labels, mask))
    np.testing.assert_allclose(dirty, clean, rtol=1e-6)
    for key in clean_metrics:
        np.testing.assert_allclose(dirty_metrics[key], clean_metrics[key], rtol=1e-6)
    full_logits, input_ids, full_mask = model_call(logits, labels, mask)
    bf16, _ = sft_loss(full_logits.astype(jnp.bfloat16), input_ids, full_mask)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, clean, rtol=2e-2)


def test_gradient_is_softmax_minus_onehot():
    logits, labels, mask = make_batch(4)
    full_logits, input_ids, full_mask = model_call(logits, labels, mask)
    full_grad = jax.jit(jax.grad(lambda x: sft_loss(x, input_ids, full_mask)[0]))(full_logits)
    assert np.all(np.asarray(full_grad)[:, -1] == 0)  # the last position predicts nothing
    grad = full_grad[:, :-1]
    probs = np.exp(np_log_softmax(logits))
    onehot = np.eye(V)[labels]
    expected = (probs - onehot) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    # The label logit is pushed up on counted tokens.
    label_grad = np.take_along_axis(np.asarray(grad), labels[..., None], -1)[..., 0]
    assert np.all(label_grad[mask > 0] < 0) and np.all(label_grad[mask == 0] == 0)


def test_jit_matches_eager():
    logits, labels, mask = model_call(*make_batch(5))
    fn = functools.partial(sft_loss, label_smoothing=0.1)
    eager, eager_metrics = fn(logits, labels, mask)
    jitted, jit_metrics = jax.jit(fn)(logits, labels, mask)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    for key in eager_metrics:
        np.testing.assert_allclose(jit_metrics[key], eager_metrics[key], rtol=1e-6)


def test_bad_inputs_raise():
    logits, labels, mask = model_call(*make_batch(6))
    with pytest.raises(ValueError, match="input_ids"):
        sft_loss(logits, labels[:, :-1], mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        sft_loss(logits, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        sft_loss(logits, labels.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="logits"):
        sft_loss(logits[0], labels, mask)
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(logits, labels, mask, label_smoothing=1.0)


@pytest.mark.parametrize("seed", [7, 8])
def test_model_logits_for_input_ids_match_shifted_numpy_oracle(seed):
    """`sft_loss(model_logits, input_ids, mask)`: logits at t-1 score the token at t, mask[:, 0]
    ignored (the convention of `sequence_logprobs`); already shifted logits raise."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(B, T, V)) * 3.0).astype(np.float32)
    input_ids = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0  # ignored: nothing predicts the first token
    mask[:, 1] = 1.0
    log_probs = np_log_softmax(logits)
    total, count = 0.0, 0.0
    for b in range(B):
        for t in range(1, T):
            total -= mask[b, t] * log_probs[b, t - 1, input_ids[b, t]]
            count += mask[b, t]
    loss, metrics = sft_loss(jnp.asarray(logits), jnp.asarray(input_ids), jnp.asarray(mask))
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["sft/perplexity"], np.exp(total / count), rtol=1e-5)
    # The same value as the shifting log-likelihood helper.
    summed = sequence_logprobs(jnp.asarray(logits), jnp.asarray(input_ids), jnp.asarray(mask))
    np.testing.assert_allclose(loss, -float(summed.sum()) / count, rtol=1e-5)
    with pytest.raises(ValueError, match="shifts them itself"):
        sft_loss(jnp.asarray(logits[:, :-1]), jnp.asarray(input_ids), jnp.asarray(mask))


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
