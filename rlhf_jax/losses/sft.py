"""Supervised fine-tuning loss: token cross-entropy over the counted tokens.

    log p_t = log_softmax(logits_t)                       (float32)
    l_t = -(1 - eps) * log p_t(y_t) - eps * mean_v log p_t(v)
    loss = sum_t(l_t * m_t) / sum_t(m_t)

`eps` is label smoothing towards the uniform distribution (Szegedy et al., 2016,
arXiv:1512.00567), the same convention as `torch.nn.CrossEntropyLoss(label_smoothing=eps)`.
The logits must already be aligned with the labels: `logits[:, t]` predicts `labels[:, t]`
(the caller drops the last logit and the first label).

`sft_loss_from_logprobs` takes the per-token statistics instead of logits (`log p_t(y_t)`,
`mean_v log p_t(v)` and whether `y_t` is the argmax), as a chunked LM head
(`ops.chunked_head`) computes them without `[B, T, V]` logits; `sft_loss` is the same loss
from logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_mean


def sft_loss(logits, labels, mask, *, label_smoothing: float = 0.0):
    """Masked token cross-entropy with optional label smoothing.

    Args:
      logits: `[B, T, V]` logits aligned with `labels`.
      labels: `[B, T]` integer target token ids; values at masked positions are ignored
        (e.g. -100 padding is fine).
      mask: `[B, T]`, 1 on tokens that count (typically the response tokens).
      label_smoothing: `eps` in `[0, 1)`.

    Returns:
      `(loss, metrics)` with `sft/loss` (the smoothed loss), `sft/nll` (plain cross-entropy),
      `sft/accuracy` (`argmax(logits) == label` over counted tokens) and `sft/perplexity`
      (`exp(sft/nll)`).
    """
    check_rank(logits, 3, "logits")
    check_floating(logits, "logits")
    check_rank(labels, 2, "labels")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"`labels` must hold integer token ids, got dtype {jnp.result_type(labels)}")
    check_same_shape(labels=labels, mask=mask)
    if jnp.shape(labels) != jnp.shape(logits)[:2]:
        raise ValueError(
            f"`labels` must have shape {jnp.shape(logits)[:2]} (the first two axes of "
            f"`logits`), got {jnp.shape(labels)}"
        )
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")

    counted = mask.astype(bool)
    safe_labels = jnp.where(counted, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    label_log_probs = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    mean_log_probs = None
    if not _is_zero(label_smoothing):
        mean_log_probs = jnp.mean(log_probs, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32)
    return sft_loss_from_logprobs(label_log_probs, mask, mean_logprobs=mean_log_probs, correct=correct,
                                  label_smoothing=label_smoothing)


def _is_zero(label_smoothing) -> bool:
    return isinstance(label_smoothing, (int, float)) and label_smoothing == 0


def sft_loss_from_logprobs(label_logprobs, mask, *, mean_logprobs=None, correct=None, label_smoothing: float = 0.0):
    """`sft_loss` from per-token statistics instead of logits.

    Args:
      label_logprobs: `[...]` `log p_t(y_t)` of the labels.
      mask: `[...]`, 1 on tokens that count; other positions are ignored (even NaN there).
      mean_logprobs: `[...]` `mean_v log p_t(v)`; needed when `label_smoothing > 0`.
      correct: `[...]` 1.0 where the label is the argmax token; None leaves out
        `sft/accuracy`.
      label_smoothing: `eps` in `[0, 1)`.

    Returns:
      `(loss, metrics)` as `sft_loss`.
    """
    check_same_shape(label_logprobs=label_logprobs, mask=mask, mean_logprobs=mean_logprobs, correct=correct)
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
    counted = mask.astype(bool)
    weights = mask.astype(jnp.float32)
    nll = -jnp.asarray(label_logprobs, jnp.float32)
    per_token = nll
    if not _is_zero(label_smoothing):
        if mean_logprobs is None:
            raise ValueError("label smoothing needs `mean_logprobs` (mean_v log p(v) per token)")
        per_token = (1.0 - label_smoothing) * nll - label_smoothing * mean_logprobs
    loss = masked_mean(jnp.where(counted, per_token, 0.0), weights)
    mean_nll = masked_mean(jnp.where(counted, nll, 0.0), weights)
    metrics = {
        "sft/loss": loss,
        "sft/nll": mean_nll,
        "sft/perplexity": jnp.exp(mean_nll),
    }
    if correct is not None:
        metrics["sft/accuracy"] = masked_mean(jnp.where(counted, correct, 0.0), weights)
    return loss, jax.lax.stop_gradient(metrics)
