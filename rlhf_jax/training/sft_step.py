"""Supervised fine-tuning step: response-only token cross-entropy.

    l[b, j] = -(1 - eps) * log p(y[b, j] | x_b, y[b, <j]) - eps * mean_v log p(v | x_b, y[b, <j])
    loss = sum_{b, j} m[b, j] * l[b, j] / sum_{b, j} m[b, j]

with `m` the trained response tokens (`SFTBatch.trained_mask`) and `eps` label smoothing
towards the uniform distribution (Szegedy et al., 2016, arXiv:1512.00567; the convention of
`torch.nn.CrossEntropyLoss(label_smoothing=eps)` and `losses.sft.sft_loss`). The log-probs,
the smoothing term and the accuracy all come from the one log-prob path
(`training.logprobs.response_logprobs(..., with_vocab_stats=True)`): only response positions
are projected to the vocabulary. The mean is over the response tokens of the whole (global)
batch, so rows with long responses weigh more, as in TRL's SFTTrainer with
`completion_only_loss`. That mean is kept exact under microbatching and data parallelism:
each microbatch/shard contributes `sum / N_global * parts` so the average over parts is the
global token mean, whatever the tokens per part.

Usage (the caller jits; the state is donated):

    step = jax.jit(sft_step, donate_argnames=("state",),
                   static_argnames=("label_smoothing", "num_microbatches"))
    state, metrics = step(state, SFTBatch(prompt_ids, prompt_mask, response_ids, response_mask))

or `make_train_step(sft_step, mesh=mesh, ...)`. Under `jax.shard_map` pass `axis_name`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.training.batches import SFTBatch
from rlhf_jax.training.logprobs import response_logprobs
from rlhf_jax.training.step_runner import gradient_step, shard_count

_TOKEN_MEAN_METRICS = ("sft/loss", "sft/nll", "sft/accuracy")


def sft_token_sums(apply_fn, params, batch: SFTBatch, *, label_smoothing: float = 0.0) -> dict:
    """Sums over the trained tokens of `batch`: `sft/loss` (smoothed CE), `sft/nll`,
    `sft/accuracy` (argmax hits) and `tokens` (their count), float32 scalars."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
    scored = response_logprobs(apply_fn, params, batch, with_vocab_stats=True)
    mask = batch.trained_mask
    nll = -scored.logprobs
    smoothed = nll if label_smoothing == 0 else (1.0 - label_smoothing) * nll - label_smoothing * scored.mean_logprob
    total = lambda x: jnp.sum(x * mask)
    return {"sft/loss": total(smoothed), "sft/nll": total(nll), "sft/accuracy": total(scored.is_argmax),
            "tokens": jnp.sum(mask)}


def sft_step(
    state,
    batch: SFTBatch,
    *,
    label_smoothing: float = 0.0,
    num_microbatches: int = 1,
    axis_name=None,
):
    """One SFT update of a `CausalLM` train state.

    Args:
      state: `TrainState` with `apply_fn = CausalLM.apply` and the model's params.
      batch: `SFTBatch` (prompts `[B, P]`, one response each `[B, 1, R]`).
      label_smoothing: eps in [0, 1) (static).
      num_microbatches: split the batch into this many slices and accumulate gradients.
      axis_name: mapped axis name when run inside `shard_map`/`pmap` (gradients and metrics
        are averaged over it); None under `jit`.

    Returns:
      `(new_state, metrics)` with `sft/loss`, `sft/nll`, `sft/accuracy`, `sft/perplexity`
      (token means over the global batch), `sft/tokens` (trained tokens in the global batch)
      and `optim/grad_norm`.
    """
    if not isinstance(batch, SFTBatch):
        raise ValueError(f"`batch` must be an SFTBatch, got {type(batch).__name__}")
    batch.validate()
    parts = num_microbatches * shard_count(axis_name)
    tokens = jnp.sum(batch.trained_mask)
    if axis_name is not None:
        tokens = jax.lax.psum(tokens, axis_name)
    # Each part's sums / (global tokens / parts): the average over parts is the global token mean.
    scale = jnp.where(tokens > 0, parts / jnp.maximum(tokens, 1e-6), 0.0)

    def loss_fn(params, microbatch):
        sums = sft_token_sums(state.apply_fn, params, microbatch, label_smoothing=label_smoothing)
        metrics = {name: jax.lax.stop_gradient(sums[name]) * scale for name in _TOKEN_MEAN_METRICS}
        return sums["sft/loss"] * scale, metrics

    new_state, metrics = gradient_step(
        state, loss_fn, batch, num_microbatches=num_microbatches, axis_name=axis_name
    )
    metrics["sft/perplexity"] = jnp.exp(metrics["sft/nll"])
    metrics["sft/tokens"] = tokens
    return new_state, metrics


__all__ = ["sft_step", "sft_token_sums"]
