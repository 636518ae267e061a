"""Reward-model step: Bradley-Terry on (chosen, rejected) pairs.

    loss = mean_b -logsig(r(x, y_w) - r(x, y_l) - margin_b) + center_coef * mean_b (r_w + r_l)^2

(Ouyang et al. 2022, arXiv:2203.02155; margin: Touvron et al. 2023, arXiv:2307.09288;
centering: Eisenstein et al. 2023, arXiv:2312.09244), with `r` a `RewardModel` score read at
each response's last real token. Each pair's prompt runs once for both responses
(`training.logprobs.response_states_at`, the prompt's keys and values shared), so a pair
costs one prompt and two responses instead of two prompts and two responses, and the last
layer runs its queries and MLP only where the scores are read.

Usage (the caller jits; the state is donated):

    step = jax.jit(reward_step, donate_argnames=("state",),
                   static_argnames=("center_coef", "num_microbatches"))
    state, metrics = step(state, PreferenceBatch(...))   # margin optional in the batch
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.losses.reward import reward_model_loss
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.logprobs import LMBatch, response_states_at
from rlhf_jax.training.step_runner import gradient_step


def response_scores(apply_fn, params, batch: LMBatch):
    """Reward-model scores `[B, N]` of every response, each prompt run once, read at each
    response's last real token (the prompt's last token for an empty response); the model's
    last layer runs its queries and MLP at that token only."""
    lengths = jnp.sum(jnp.asarray(batch.response_mask, jnp.int32), axis=-1)  # [B, N]
    ends = response_states_at(apply_fn, params, batch, lengths - 1)  # [B, N, D]
    return apply_fn({"params": params}, ends, method="scores_from_hidden")


def pair_scores(apply_fn, params, batch: PreferenceBatch):
    """Reward-model scores `(chosen [B], rejected [B])` of a PreferenceBatch."""
    scores = response_scores(apply_fn, params, batch)
    return scores[:, 0], scores[:, 1]


def reward_step(
    state,
    batch: PreferenceBatch,
    *,
    center_coef: float = 0.0,
    num_microbatches: int = 1,
    axis_name=None,
):
    """One reward-model update.

    Args:
      state: `TrainState` with `apply_fn = RewardModel.apply` and its params.
      batch: `PreferenceBatch`; `ref_logps` is not read; `margin` [B] (optional) is the
        per-pair margin.
      center_coef: weight of the score-centering term (static).
      num_microbatches: split the batch into this many slices and accumulate gradients.
      axis_name: mapped axis name inside `shard_map`/`pmap`; None under `jit`.

    Returns:
      `(new_state, metrics)` with `reward/loss`, `reward/accuracy`, `reward/margin`,
      `reward/chosen`, `reward/rejected` (see `reward_model_loss`) and `optim/grad_norm`.
    """
    if not isinstance(batch, PreferenceBatch):
        raise ValueError(f"`batch` must be a PreferenceBatch, got {type(batch).__name__}")
    batch.validate()
    batch = batch.replace(ref_logps=None)  # not read: keep it out of the microbatch scan

    def loss_fn(params, microbatch):
        chosen, rejected = pair_scores(state.apply_fn, params, microbatch)
        return reward_model_loss(chosen, rejected, margin=microbatch.margin, center_coef=center_coef)

    return gradient_step(state, loss_fn, batch, num_microbatches=num_microbatches, axis_name=axis_name)


__all__ = ["reward_step", "pair_scores", "response_scores"]
