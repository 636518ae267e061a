"""Per-token rewards for KL-regularised RLHF (the PPO reward-shaping step)."""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_in, check_rank, check_same_shape
from rlhf_jax.ops.kl import KL_ESTIMATORS, kl_estimate
from rlhf_jax.ops.masking import last_token_index


def shape_rewards(
    scores,
    logp,
    ref_logp,
    mask,
    *,
    kl_coef,
    kl_estimator="k1",
    has_eos=None,
    missing_eos_score=None,
    score_clip=None,
):
    """Spread a sequence score over response tokens with a per-token KL penalty.

    Ziegler et al. (2019), arXiv:1909.08593; Ouyang et al. (2022), arXiv:2203.02155:

        rewards[b, t] = -kl_coef * KL_t[b] * mask[b, t] + score[b] * [t == last(b)]

    where `KL_t = kl_estimate(logp, ref_logp, kl_estimator)` and `last(b)` is the last counted
    token of row `b` (the EOS token of a right-padded response, never a pad slot after it).
    The score is first clipped to `[-score_clip, score_clip]` when `score_clip` is given; then
    rows without an EOS token get `missing_eos_score` instead when both `has_eos` and
    `missing_eos_score` are given. Rows whose mask is all zero get all-zero rewards, and
    padding gets exactly 0 whatever `logp` / `ref_logp` hold there (even -inf or NaN).

    Args:
      scores: `[B]` reward-model scores of the whole sequences.
      logp: `[B, T]` policy log-probabilities of the response tokens (at rollout time).
      ref_logp: `[B, T]` reference-model log-probabilities of the same tokens.
      mask: `[B, T]` 1 on response tokens, 0 on padding (bool or float).
      kl_coef: KL-penalty coefficient, a Python float or a traced scalar (e.g. the
        `coef` of a `KLControllerState`).
      kl_estimator: `"k1"`, `"k2"` or `"k3"` (see `kl_estimate`).
      has_eos: optional `[B]` bool, whether each response ended with an EOS token.
      missing_eos_score: optional score (e.g. -1.0) for responses with no EOS; needs `has_eos`.
      score_clip: optional `c > 0`; scores are clipped to `[-c, c]`.

    Returns:
      `[B, T]` float32 per-token rewards, 0 on padding.
    """
    check_in(kl_estimator, KL_ESTIMATORS, "kl_estimator")
    check_rank(logp, 2, "logp")
    check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    check_rank(scores, 1, "scores")
    check_floating(scores, "scores")
    batch, time = jnp.shape(logp)
    if jnp.shape(scores) != (batch,):
        raise ValueError(
            f"`scores` must have shape ({batch},) to match `logp`, got {jnp.shape(scores)}"
        )
    if jnp.ndim(kl_coef) != 0:
        raise ValueError(f"`kl_coef` must be a scalar, got shape {jnp.shape(kl_coef)}")
    if missing_eos_score is not None and has_eos is None:
        raise ValueError("`missing_eos_score` needs `has_eos` to know which rows lack an EOS token")
    if has_eos is not None and jnp.shape(has_eos) != (batch,):
        raise ValueError(f"`has_eos` must have shape ({batch},), got {jnp.shape(has_eos)}")
    if score_clip is not None and isinstance(score_clip, (int, float)) and not score_clip > 0:
        raise ValueError(f"`score_clip` must be > 0, got {score_clip}")

    counted = jnp.asarray(mask, jnp.float32)
    kl = kl_estimate(logp, ref_logp, kind=kl_estimator).astype(jnp.float32)
    # `where`, not a product: log-probs of pad tokens may be -inf, and -inf * 0 is NaN.
    rewards = jnp.where(counted != 0, -jnp.asarray(kl_coef, jnp.float32) * kl, 0.0)

    scores = jnp.asarray(scores, jnp.float32)
    if score_clip is not None:
        score_clip = jnp.asarray(score_clip, jnp.float32)
        scores = jnp.clip(scores, -score_clip, score_clip)
    if has_eos is not None and missing_eos_score is not None:
        scores = jnp.where(jnp.asarray(has_eos, bool), scores, jnp.float32(missing_eos_score))

    row_has_tokens = jnp.any(counted != 0, axis=1)  # [B]
    is_last = jnp.arange(time)[None, :] == last_token_index(counted)[:, None]  # [B, T]
    return rewards + jnp.where(is_last & row_has_tokens[:, None], scores[:, None], 0.0)
