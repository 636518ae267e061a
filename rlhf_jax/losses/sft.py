"""Supervised fine-tuning loss: token cross-entropy over the counted tokens.

    log p_t = log_softmax(logits_{t-1})                   (float32; token t is predicted at t-1)
    l_t = -(1 - eps) * log p_t(x_t) - eps * mean_v log p_t(v)
    loss = sum_{t>=1}(l_t * m_t) / sum_{t>=1}(m_t)

`eps` is label smoothing towards the uniform distribution (Szegedy et al., 2016,
arXiv:1512.00567), the same convention as `torch.nn.CrossEntropyLoss(label_smoothing=eps)`.
Causal-shift convention (docs/numerics.md, the same across `rlhf_jax.losses` and
`rlhf_jax.ops`): functions that take a model's logits take them for the whole `input_ids` and
shift themselves; functions that take per-token log-probs take them aligned with the tokens
they score. So `sft_loss(model_logits, input_ids, mask)` is the loss, as
`ops.sequence_logprobs(model_logits, input_ids, mask)` is the log-likelihood; logits that are
already shifted (`[B, T-1, V]` with `input_ids [B, T]`) raise a ValueError.

`sft_loss_from_logprobs` takes the per-token statistics instead of logits (`log p_t(y_t)`,
`mean_v log p_t(v)` and whether `y_t` is the argmax), as a chunked LM head
(`ops.chunked_head`) computes them without `[B, T, V]` logits; `sft_loss` is the same loss
from logits.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_rank, check_same_shape, check_token_ids
from rlhf_jax.ops.masking import masked_mean


def sft_loss(logits, input_ids, mask, *, label_smoothing: float = 0.0):
    """Masked next-token cross-entropy with optional label smoothing, from a model's logits.

    `logits[:, t - 1]` predicts `input_ids[:, t]` (the shift is done here, as in
    `ops.sequence_logprobs`); `mask[:, 0]` is ignored because nothing predicts the first token.

    Args:
      logits: `[B, T, V]` the model's logits for `input_ids` (unshifted).
      input_ids: `[B, T]` integer token ids; values at masked positions are ignored
        (e.g. -100 padding is fine).
      mask: `[B, T]`, 1 on tokens that count (typically the response tokens).
      label_smoothing: `eps` in `[0, 1)`.

    Returns:
      `(loss, metrics)` with `sft/loss` (the smoothed loss), `sft/nll` (plain cross-entropy),
      `sft/accuracy` (`argmax(logits[:, t-1]) == input_ids[:, t]` over counted tokens) and
      `sft/perplexity` (`exp(sft/nll)`).

    Raises:
      ValueError: when `logits.shape[:2] != input_ids.shape`, e.g. logits shifted already;
        when a counted token (mask 1, `t >= 1`) is not in `[0, V)`, e.g. a -100 label under
        mask 1 (checked for concrete arrays; under `jax.jit` such a token makes the loss NaN).
    """
    check_rank(logits, 3, "logits")
    check_floating(logits, "logits")
    check_rank(input_ids, 2, "input_ids")
    if not jnp.issubdtype(jnp.result_type(input_ids), jnp.integer):
        raise ValueError(f"`input_ids` must hold integer token ids, got dtype {jnp.result_type(input_ids)}")
    check_same_shape(input_ids=input_ids, mask=mask)
    if jnp.shape(input_ids) != jnp.shape(logits)[:2]:
        raise ValueError(
            f"`logits` must be the model's logits for the whole `input_ids` ([B, T, V] with "
            f"input_ids [B, T]; sft_loss shifts them itself), got logits {jnp.shape(logits)} "
            f"and input_ids {jnp.shape(input_ids)}"
        )
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
    # e.g. Hugging Face-style labels (-100 on the prompt) with the attention mask as `mask`;
    # concrete arrays only (under jit such an id would make the loss NaN)
    check_token_ids(input_ids, mask, "input_ids", jnp.shape(logits)[-1], from_position=1)

    logits, labels, mask = logits[:, :-1], input_ids[:, 1:], mask[:, 1:]
    counted = mask.astype(bool)
    safe_labels = jnp.where(counted, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T-1, V]
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

    The statistics are aligned with the tokens they score (no shift here): position `t` of
    every argument describes the prediction of the same token.

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
