"""Supervised fine-tuning step: response-only token cross-entropy.

    loss = sum_{b, t} m[b, t] * CE(logits[b, t - 1], y[b, t]) / sum_{b, t} m[b, t]

with `m = loss_mask` (1 on response tokens) and label smoothing as in `losses.sft.sft_loss`.
The mean is over the response tokens of the whole (global) batch, so rows with long responses
weigh more, as in TRL's SFTTrainer with `completion_only_loss`. That mean is kept exact under
microbatching and data parallelism: each microbatch/shard contributes `sum / N_global * parts`
so the average over parts is the global token mean, whatever the tokens per part.

Usage (the caller jits; the state is donated):

    step = jax.jit(sft_step, donate_argnames=("state",),
                   static_argnames=("label_smoothing", "response_window", "num_microbatches"))
    state, metrics = step(state, SFTBatch(input_ids, attention_mask, loss_mask))

or `make_train_step(sft_step, mesh=mesh, ...)`. Under `jax.shard_map` pass `axis_name`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.training.batches import SFTBatch
from rlhf_jax.training.policy_logps import response_logits
from rlhf_jax.training.step_runner import gradient_step, shard_count

_TOKEN_MEAN_METRICS = ("sft/loss", "sft/nll", "sft/accuracy")


def sft_step(
    state,
    batch: SFTBatch,
    *,
    label_smoothing: float = 0.0,
    response_window: int | None = None,
    num_microbatches: int = 1,
    axis_name=None,
):
    """One SFT update of a `CausalLM` train state.

    Args:
      state: `TrainState` with `apply_fn = CausalLM.apply` and the model's params.
      batch: `SFTBatch` of `[B, T]` arrays.
      label_smoothing: eps in [0, 1) (static).
      response_window: None, or a static number of positions per row at which to project to
        the vocabulary (see `policy_logps`).
      num_microbatches: split the batch into this many slices and accumulate gradients.
      axis_name: mapped axis name when run inside `shard_map`/`pmap` (gradients and metrics
        are averaged over it); None under `jit`.

    Returns:
      `(new_state, metrics)` with `sft/loss`, `sft/nll`, `sft/accuracy`, `sft/perplexity`
      (token means over the global batch), `sft/tokens` (response tokens in the global batch),
      `optim/grad_norm`, and `train/tokens_outside_window` with a window (mean per
      sequence of counted tokens the window missed; should be 0).
    """
    if not isinstance(batch, SFTBatch):
        raise ValueError(f"`batch` must be an SFTBatch, got {type(batch).__name__}")
    batch.validate()
    parts = num_microbatches * shard_count(axis_name)
    tokens = jnp.sum(jnp.asarray(batch.loss_mask[:, 1:], jnp.float32))
    if axis_name is not None:
        tokens = jax.lax.psum(tokens, axis_name)
    tokens_per_part = tokens / parts

    def loss_fn(params, microbatch):
        scored = response_logits(
            state.apply_fn, params, microbatch.input_ids, microbatch.attention_mask,
            microbatch.loss_mask, response_window=response_window,
        )
        loss, metrics = sft_loss(scored.logits, scored.labels, scored.mask, label_smoothing=label_smoothing)
        # weight = this part's tokens / the mean tokens per part: the average over parts of
        # weight * (token mean of the part) is the global token mean.
        part_tokens = jnp.sum(scored.mask)
        weight = jnp.where(tokens_per_part > 0, part_tokens / jnp.maximum(tokens_per_part, 1e-6), 0.0)
        metrics = {name: metrics[name] * weight for name in _TOKEN_MEAN_METRICS}
        if response_window is not None:
            metrics["train/tokens_outside_window"] = jnp.mean(scored.outside_window)
        return loss * weight, metrics

    new_state, metrics = gradient_step(
        state, loss_fn, batch, num_microbatches=num_microbatches, axis_name=axis_name
    )
    metrics["sft/perplexity"] = jnp.exp(metrics["sft/nll"])
    metrics["sft/tokens"] = tokens
    return new_state, metrics


__all__ = ["sft_step"]
