"""Preference losses without a reference model: SimPO, CPO and ORPO.

Each takes the policy's sequence log-probs of the chosen and rejected responses (`[B]`) and,
for CPO and ORPO, the chosen response's mean token negative log-likelihood `[B]` (the SFT
term), and returns `(loss, metrics)` with the loss averaged over the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.preference_types import smoothed_logistic_loss
from rlhf_jax.ops.checks import check_floating, check_nonempty, check_positive, check_rank, check_same_shape

__all__ = ["simpo_loss", "cpo_loss", "orpo_loss", "log_odds"]

# Mean log-probs are clamped to at most this value before taking log-odds, so a response
# with probability 1 (log-prob 0) gets large but finite odds instead of infinity.
MAX_MEAN_LOGP_FOR_ODDS = -1e-6


def _prepare(label_smoothing=None, **arrays):
    """Check `[B]` floating arrays of one shape; return them in (at least) float32."""
    for name, value in arrays.items():
        check_rank(value, 1, name)
        check_floating(value, name)
    check_same_shape(**arrays)
    name, value = next(iter(arrays.items()))
    check_nonempty(value, name)
    if label_smoothing is not None and isinstance(label_smoothing, (int, float)):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing}")
    dtype = jnp.promote_types(jnp.result_type(*arrays.values()), jnp.float32)
    return [jnp.asarray(value, dtype) for value in arrays.values()]


def _scaled_rewards(beta, label_smoothing, **arrays):
    """Check `beta` and the arrays (chosen, rejected, then any others, as in `_prepare`);
    return `beta * chosen`, `beta * rejected` and the others."""
    check_positive(beta, "beta")
    chosen, rejected, *others = _prepare(label_smoothing, **arrays)
    return (beta * chosen, beta * rejected, *others)


def _reward_metrics(prefix, chosen_rewards, rejected_rewards, dtype):
    """`{prefix}/accuracy` (mean chosen > rejected), `/margin`, `/rewards_chosen`, `/rewards_rejected`."""
    return {
        f"{prefix}/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
        f"{prefix}/margin": jnp.mean(chosen_rewards - rejected_rewards),
        f"{prefix}/rewards_chosen": jnp.mean(chosen_rewards),
        f"{prefix}/rewards_rejected": jnp.mean(rejected_rewards),
    }


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta=2.0, target_margin=0.5, label_smoothing=0.0):
    """SimPO: `-logsig(beta*(lbar_w - lbar_l) - target_margin)` (Meng et al. 2024, arXiv:2405.14734).

    The implicit reward is the length-normalised log-prob `beta * lbar`; `target_margin` is the target
    reward margin. With label smoothing eps the loss is
    `-(1-eps)*logsig(z) - eps*logsig(-z)` with `z = beta*(lbar_w - lbar_l) - target_margin`.

    Args:
      chosen_avg_logps: `[B]` per-token mean log-prob of each chosen response under the policy.
      rejected_avg_logps: `[B]` the same for the rejected responses.
      beta: reward scale; > 0 (the paper uses 2.0-2.5).
      target_margin: target margin between chosen and rejected rewards.
      label_smoothing: eps in [0, 1).

    Returns:
      `(loss, metrics)` with `simpo/loss`, `simpo/accuracy` (mean reward_w > reward_l),
      `simpo/margin` (mean `beta*(lbar_w - lbar_l)`), `simpo/rewards_chosen`,
      `simpo/rewards_rejected` (mean `beta*lbar`).
    """
    chosen_rewards, rejected_rewards = _scaled_rewards(
        beta, label_smoothing, chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps
    )
    logits = chosen_rewards - rejected_rewards - target_margin
    loss = jnp.mean(smoothed_logistic_loss(logits, label_smoothing))
    metrics = {
        "simpo/loss": loss,
        **_reward_metrics("simpo", chosen_rewards, rejected_rewards, loss.dtype),
    }
    return loss, metrics


def cpo_loss(chosen_logps, rejected_logps, chosen_nll, *, beta=0.1, nll_coef=1.0, label_smoothing=0.0):
    """CPO: `-logsig(beta*(log pi_w - log pi_l)) + nll_coef * NLL(chosen)` (Xu et al. 2024, arXiv:2401.08417).

    The preference term is DPO with a uniform reference (label-smoothed like cDPO when
    eps > 0); the NLL term keeps the policy on the chosen data.

    Args:
      chosen_logps: `[B]` summed log-probs of the chosen responses under the policy.
      rejected_logps: `[B]` summed log-probs of the rejected responses.
      chosen_nll: `[B]` mean token negative log-likelihood of each chosen response.
      beta: reward scale; > 0.
      nll_coef: weight of the NLL term.
      label_smoothing: eps in [0, 1).

    Returns:
      `(loss, metrics)` with `cpo/loss`, `cpo/preference_loss`, `cpo/nll`, `cpo/accuracy`,
      `cpo/margin` (mean `beta*(log pi_w - log pi_l)`), `cpo/rewards_chosen`,
      `cpo/rewards_rejected`.
    """
    chosen_rewards, rejected_rewards, nll = _scaled_rewards(
        beta, label_smoothing, chosen_logps=chosen_logps, rejected_logps=rejected_logps, chosen_nll=chosen_nll
    )
    preference_loss = jnp.mean(smoothed_logistic_loss(chosen_rewards - rejected_rewards, label_smoothing))
    mean_nll = jnp.mean(nll)
    loss = preference_loss + nll_coef * mean_nll
    metrics = {
        "cpo/loss": loss,
        "cpo/preference_loss": preference_loss,
        "cpo/nll": mean_nll,
        **_reward_metrics("cpo", chosen_rewards, rejected_rewards, loss.dtype),
    }
    return loss, metrics


def log_odds(avg_logps):
    """`log(p / (1 - p))` from `log p`: `x - log(1 - exp(x))`, computed stably.

    `log(1 - exp(x))` uses `log(-expm1(x))` near 0 and `log1p(-exp(x))` below `-log 2`
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"). Inputs are clamped to at
    most `MAX_MEAN_LOGP_FOR_ODDS` so that `x = 0` stays finite.
    """
    x = jnp.minimum(avg_logps, MAX_MEAN_LOGP_FOR_ODDS)
    near_zero = x > -jnp.log(2.0)
    # Evaluate each branch on a safe argument so neither produces NaN gradients.
    log1mexp = jnp.where(
        near_zero,
        jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x))),
    )
    return x - log1mexp


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, odds_ratio_coef=0.1):
    """ORPO: `NLL(chosen) - odds_ratio_coef * logsig(log_odds(lbar_w) - log_odds(lbar_l))` (Hong et al. 2024, arXiv:2403.07691).

    The odds of a response are `p / (1 - p)` with `p = exp(lbar)`, the geometric-mean token
    probability; the odds-ratio term pushes the chosen odds above the rejected ones while
    the NLL term does supervised fine-tuning on the chosen response.

    Args:
      chosen_avg_logps: `[B]` per-token mean log-prob of each chosen response (<= 0).
      rejected_avg_logps: `[B]` the same for the rejected responses.
      chosen_nll: `[B]` mean token negative log-likelihood of each chosen response.
      odds_ratio_coef: weight of the odds-ratio term (lambda in the paper).

    Returns:
      `(loss, metrics)` with `orpo/loss`, `orpo/nll`, `orpo/odds_ratio_loss` (mean
      `-logsig(log odds ratio)`), `orpo/log_odds_ratio`, `orpo/accuracy` (mean
      lbar_w > lbar_l), `orpo/margin` (mean `lbar_w - lbar_l`).
    """
    chosen, rejected, nll = _prepare(
        chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps, chosen_nll=chosen_nll
    )
    log_odds_ratio = log_odds(chosen) - log_odds(rejected)
    odds_ratio_loss = -jnp.mean(jax.nn.log_sigmoid(log_odds_ratio))
    mean_nll = jnp.mean(nll)
    loss = mean_nll + odds_ratio_coef * odds_ratio_loss
    metrics = {
        "orpo/loss": loss,
        "orpo/nll": mean_nll,
        "orpo/odds_ratio_loss": odds_ratio_loss,
        "orpo/log_odds_ratio": jnp.mean(log_odds_ratio),
        "orpo/accuracy": jnp.mean((chosen > rejected).astype(loss.dtype)),
        "orpo/margin": jnp.mean(chosen - rejected),
    }
    return loss, metrics
