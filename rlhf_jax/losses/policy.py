"""Clipped policy-gradient losses: PPO (with dual-clip and asymmetric clipping) and GRPO.

Both share one per-token surrogate,

    loss_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps_low, 1 + eps_high)),

(equivalently `-min(rho*A, clip(rho)*A)`), where `rho_t = pi(y_t) / pi_old(y_t)`. They
differ in the reduction (`aggregation`, see `rlhf_jax.losses.aggregation`) and in GRPO's
per-token k3 KL penalty towards a reference policy.

- PPO: Schulman et al., 2017, arXiv:1707.06347.
- Dual-clip PPO: Ye et al., 2020, arXiv:1912.09729 (for A < 0 the loss is capped at `-c*A`).
- Asymmetric clipping ("clip-higher") and token-level aggregation: DAPO, Yu et al., 2025,
  arXiv:2503.14476.
- GRPO: Shao et al., 2024, arXiv:2402.03300; Dr. GRPO: Liu et al., 2025, arXiv:2503.20783.
- GSPO (`importance_level="sequence"`): Zheng et al., 2025, arXiv:2507.18071, with the
  sequence ratio `rho_i = exp(mean_t(logp - old_logp))` applied to every token of sequence i.

`old_logp`, `ref_logp` and `advantages` are treated as constants (stop-gradient); gradients
flow only through `logp`. Padding positions never produce NaN: their log-ratios are zeroed
before the exponential.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.aggregation import aggregate, check_aggregation
from rlhf_jax.ops.checks import (
    check_floating,
    check_in,
    check_positive,
    check_rank,
    check_same_shape,
)
from rlhf_jax.ops.kl import kl_estimate
from rlhf_jax.ops.masking import masked_mean

IMPORTANCE_LEVELS = ("token", "sequence")


def _check_token_inputs(logp, mask, **same_shape) -> None:
    check_rank(logp, 2, "logp")
    check_floating(logp, "logp")
    check_same_shape(logp=logp, mask=mask, **same_shape)


def _broadcast_advantages(advantages, shape):
    """`[B]` or `[B, T]` advantages -> float32 `[B, T]` constants."""
    check_rank(advantages, (1, 2), "advantages")
    if jnp.shape(advantages) not in (tuple(shape), tuple(shape[:1])):
        raise ValueError(
            f"`advantages` must have shape {tuple(shape)} or {tuple(shape[:1])}, "
            f"got {jnp.shape(advantages)}"
        )
    advantages = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    return jnp.broadcast_to(advantages, shape)


def _log_ratio(logp, old_logp, mask, importance_level):
    """Per-token `log rho` as float32 `[B, T]`, zero on padding.

    For `"sequence"` every token of row i carries `mean_t(logp - old_logp)` of that row.
    """
    counted = mask.astype(bool)
    token_log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(
        old_logp.astype(jnp.float32)
    )
    token_log_ratio = jnp.where(counted, token_log_ratio, 0.0)
    if importance_level == "token":
        return token_log_ratio, token_log_ratio
    sequence_log_ratio = masked_mean(token_log_ratio, mask.astype(jnp.float32), axis=1)
    return jnp.where(counted, sequence_log_ratio[:, None], 0.0), token_log_ratio


def _clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip):
    """Per-token clipped loss and boolean maps of where each clip branch is active."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is None:
        return loss, clip_active, jnp.zeros_like(clip_active)
    cap = -dual_clip * advantages
    dual_active = (advantages < 0) & (loss > cap)
    loss = jnp.where(advantages < 0, jnp.minimum(loss, cap), loss)
    return loss, clip_active, dual_active


def _check_options(eps_low, eps_high, dual_clip, aggregation, importance_level) -> None:
    check_positive(eps_low, "clip_eps_low")
    check_positive(eps_high, "clip_eps_high")
    if dual_clip is not None and isinstance(dual_clip, (int, float)) and not dual_clip > 1:
        raise ValueError(f"`dual_clip` must be > 1, got {dual_clip}")
    check_aggregation(aggregation)
    check_in(importance_level, IMPORTANCE_LEVELS, "importance_level")


def _max_over_mask(x, mask):
    return jnp.max(jnp.where(mask.astype(bool), x, -jnp.inf), initial=0.0)


class _ClippedTerms(NamedTuple):
    per_token: jax.Array  # [B, T] clipped surrogate loss
    ratio: jax.Array  # [B, T] importance ratio rho, 1 on padding
    token_log_ratio: jax.Array  # [B, T] per-token logp - old_logp, 0 on padding
    weights: jax.Array  # [B, T] float32 mask
    # ratio statistics over the units the ratio is taken over: counted tokens, or with
    # importance_level "sequence" responses (the mean over responses of each one's token mean)
    clipfrac: jax.Array  # fraction where the clipped branch is larger
    dual_clipfrac: jax.Array  # fraction capped by the dual clip
    ratio_mean: jax.Array  # mean ratio


def _clipped_terms(
    logp, old_logp, advantages, mask, *, eps_low, eps_high, dual_clip, aggregation, importance_level
) -> _ClippedTerms:
    """The per-token clipped surrogate shared by PPO and GRPO, and its token-mean statistics."""
    _check_options(eps_low, eps_high, dual_clip, aggregation, importance_level)
    advantages = _broadcast_advantages(advantages, logp.shape)
    log_ratio, token_log_ratio = _log_ratio(logp, old_logp, mask, importance_level)
    ratio = jnp.exp(log_ratio)
    per_token, clip_active, dual_active = _clipped_surrogate(
        ratio, advantages, eps_low, eps_high, dual_clip
    )
    weights = mask.astype(jnp.float32)
    # GSPO: one ratio per response, so its statistics weigh responses alike (1 / length per token)
    units = weights if importance_level == "token" else \
        weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1.0)
    return _ClippedTerms(
        per_token=per_token,
        ratio=ratio,
        token_log_ratio=token_log_ratio,
        weights=weights,
        clipfrac=masked_mean(clip_active.astype(jnp.float32), units),
        dual_clipfrac=masked_mean(dual_active.astype(jnp.float32), units),
        ratio_mean=masked_mean(ratio, units),
    )


def ppo_policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token_mean",
    importance_level: str = "token",
    max_len: int | None = None,
    global_token_count=None,
):
    """PPO clipped surrogate loss (Schulman et al., 2017, arXiv:1707.06347).

    Per token: `max(-A*rho, -A*clip(rho, 1 - eps_low, 1 + eps_high))` with
    `rho = exp(logp - old_logp)`; with `dual_clip = c > 1` (Ye et al., 2020,
    arXiv:1912.09729) tokens with `A < 0` get `min(that, -c*A)`. The per-token loss is
    reduced with `aggregate(..., aggregation)`.

    Args:
      logp: `[B, T]` log-probs of the taken tokens under the current policy.
      old_logp: `[B, T]` log-probs under the policy that sampled them (stop-gradient).
      advantages: `[B, T]` per-token or `[B]` per-sequence advantages (stop-gradient).
      mask: `[B, T]`, 1 on response tokens.
      clip_eps: symmetric clip range; `clip_eps_low` / `clip_eps_high` override each side.
      dual_clip: optional `c > 1` bounding the loss of negative-advantage tokens.
      aggregation: one of `AGGREGATION_MODES`.
      importance_level: `"token"` (PPO) or `"sequence"` (GSPO, Zheng et al., 2025,
        arXiv:2507.18071: `rho_i = exp(mean_t(logp - old_logp))` for every token of row i).
      max_len, global_token_count: forwarded to `aggregate` (`dr_grpo` / `dapo`).

    Returns:
      `(loss, metrics)` with `ppo/policy_loss`, `ppo/clipfrac` (fraction of counted tokens
      where the clipped branch is strictly larger), `ppo/dual_clipfrac`, `ppo/approx_kl`
      (`0.5 * mean((logp - old_logp)**2)` over tokens), `ppo/ratio_mean`, `ppo/ratio_max`;
      with `importance_level="sequence"` clipfrac, dual_clipfrac and ratio_mean are means over
      responses (of each response's token mean), as its ratio is one per response.
    """
    _check_token_inputs(logp, mask, old_logp=old_logp)
    eps_low = clip_eps if clip_eps_low is None else clip_eps_low
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    terms = _clipped_terms(
        logp, old_logp, advantages, mask, eps_low=eps_low, eps_high=eps_high,
        dual_clip=dual_clip, aggregation=aggregation, importance_level=importance_level,
    )
    loss = aggregate(
        terms.per_token, mask, aggregation, max_len=max_len, global_token_count=global_token_count
    )
    metrics = {
        "ppo/policy_loss": loss,
        "ppo/clipfrac": terms.clipfrac,
        "ppo/dual_clipfrac": terms.dual_clipfrac,
        "ppo/approx_kl": 0.5 * masked_mean(terms.token_log_ratio**2, terms.weights),
        "ppo/ratio_mean": terms.ratio_mean,
        "ppo/ratio_max": _max_over_mask(terms.ratio, mask),
    }
    return loss, jax.lax.stop_gradient(metrics)


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_low: float | None = None,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.04,
    aggregation: str = "grpo",
    importance_level: str = "token",
    max_len: int | None = None,
    global_token_count=None,
    kl_logp=None,
    kl_importance_weighted: bool = False,
):
    """GRPO loss (Shao et al., 2024, arXiv:2402.03300) and its DAPO / Dr. GRPO / GSPO variants.

    Per token: `-min(rho*A, clip(rho, 1 - eps_low, 1 + eps_high)*A) + kl_coef*k3`, with
    `k3 = exp(ref_logp - kl_logp) - 1 - (ref_logp - kl_logp)` (unbiased, non-negative estimate
    of KL(pi || pi_ref); `kl_logp` defaults to `logp`), reduced with `aggregate(..., aggregation)`.
    With `kl_importance_weighted`, the KL term is `rho * k3` (rho the same ratio as the surrogate's,
    with its gradient): the tokens were drawn from pi_old, so this is the unbiased estimate of
    KL(pi || pi_ref) and of its gradient (DeepSeek-AI 2025, DeepSeek-V3.2, arXiv:2512.02556;
    TRL's `use_bias_correction_kl`). Its gradient differs from plain k3's even at rho = 1.

    Variants: DAPO (arXiv:2503.14476) = `aggregation="dapo"`, `clip_eps_high=0.28`, `kl_coef=0`;
    Dr. GRPO (arXiv:2503.20783) = `aggregation="dr_grpo"` with unscaled advantages;
    GSPO (arXiv:2507.18071) = `importance_level="sequence"`.

    Args:
      logp, old_logp: `[B, T]` log-probs under the current / sampling policy. With a single
        update per rollout, pass `old_logp=logp`: the ratio is 1 and the gradient is
        `A * grad logp`.
      ref_logp: `[B, T]` log-probs under the reference policy (stop-gradient); may be
        `None` when `kl_coef == 0`.
      advantages: `[B]` group-relative advantages or `[B, T]` per-token ones.
      mask: `[B, T]`, 1 on response tokens.
      clip_eps: symmetric clip range; `clip_eps_low` / `clip_eps_high` override each side.
      kl_coef: KL coefficient.
      aggregation, importance_level, max_len, global_token_count: as in `ppo_policy_loss`.
      kl_logp: optional `[B, T]` current-policy log-probs for the KL term only (gradient flows);
        None = `logp`. With top-k / top-p rollouts `logp` are the kept set's (the ratios) and
        `kl_logp` the unfiltered softmax's, so the KL is 0 at the reference.
      kl_importance_weighted: weight each token's k3 by the importance ratio (see above).

    Returns:
      `(loss, metrics)` with `grpo/loss`, `grpo/clipfrac`, `grpo/kl` (token mean of k3; absent
      when `ref_logp` is None: no KL was computed) and `grpo/ratio_mean` (clipfrac and
      ratio_mean: over counted tokens, or over responses with `importance_level="sequence"`).
    """
    _check_token_inputs(logp, mask, old_logp=old_logp, ref_logp=ref_logp, kl_logp=kl_logp)
    if ref_logp is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("`ref_logp` may be None only when `kl_coef` is 0")
    terms = _clipped_terms(
        logp, old_logp, advantages, mask, eps_low=clip_eps if clip_eps_low is None else clip_eps_low,
        eps_high=clip_eps if clip_eps_high is None else clip_eps_high, dual_clip=None, aggregation=aggregation, importance_level=importance_level,
    )
    per_token = terms.per_token
    counted = mask.astype(bool)
    kl = None
    if ref_logp is not None:
        # Zero both sides on padding so garbage there cannot reach exp() or the gradient.
        safe_logp = jnp.where(counted, (logp if kl_logp is None else kl_logp).astype(jnp.float32), 0.0)
        safe_ref_logp = jnp.where(counted, jax.lax.stop_gradient(ref_logp), 0.0)
        kl = kl_estimate(safe_logp, safe_ref_logp, "k3")
        if kl_importance_weighted:
            kl = kl * terms.ratio
        per_token = per_token + kl_coef * kl
    loss = aggregate(
        per_token, mask, aggregation, max_len=max_len, global_token_count=global_token_count
    )
    metrics = {"grpo/loss": loss, "grpo/clipfrac": terms.clipfrac, "grpo/ratio_mean": terms.ratio_mean}
    if kl is not None:
        metrics["grpo/kl"] = masked_mean(kl, terms.weights)
    return loss, jax.lax.stop_gradient(metrics)
