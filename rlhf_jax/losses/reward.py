"""Bradley-Terry reward-model loss, with optional margin, centering and ensembles."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_nonempty, check_rank, check_same_shape

__all__ = ["reward_model_loss", "ensemble_scores", "ensemble_reward_model_loss"]


def _compute_dtype(*arrays):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0):
    """Pairwise reward-model loss `mean(-logsig(r_w - r_l - m)) + center_coef * mean((r_w + r_l)**2)`.

    Bradley-Terry preference likelihood as used for RLHF reward models (Ouyang et al. 2022,
    arXiv:2203.02155). The optional margin `m` asks for a larger gap on pairs rated more
    clearly apart (Llama 2, Touvron et al. 2023, arXiv:2307.09288); the centering term keeps
    the scores near zero, since the Bradley-Terry loss is blind to a shared offset (Eisenstein
    et al. 2023, arXiv:2312.09244).

    Args:
      chosen_rewards: `[B]` scalar scores of the chosen responses.
      rejected_rewards: `[B]` scores of the rejected responses.
      margin: None, a scalar, or `[B]` per-pair margins.
      center_coef: weight of the centering term (0 disables it).

    Returns:
      `(loss, metrics)` with `reward/loss`, `reward/accuracy` (mean `r_w > r_l`),
      `reward/margin` (mean `r_w - r_l`), `reward/chosen`, `reward/rejected` (mean scores).
    """
    for name, value in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        check_rank(value, 1, name)
        check_floating(value, name)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    check_nonempty(chosen_rewards, "chosen_rewards")
    dtype = _compute_dtype(chosen_rewards, rejected_rewards)
    chosen = jnp.asarray(chosen_rewards, dtype)
    rejected = jnp.asarray(rejected_rewards, dtype)
    gap = chosen - rejected
    logits = gap
    if margin is not None:
        check_rank(margin, (0, 1), "margin")
        if jnp.ndim(margin) == 1:
            check_same_shape(chosen_rewards=chosen_rewards, margin=margin)
        logits = gap - jnp.asarray(margin, dtype)
    loss = -jnp.mean(jax.nn.log_sigmoid(logits))
    if not (isinstance(center_coef, (int, float)) and center_coef == 0):
        loss = loss + center_coef * jnp.mean((chosen + rejected) ** 2)
    metrics = {
        "reward/loss": loss,
        "reward/accuracy": jnp.mean((chosen > rejected).astype(dtype)),
        "reward/margin": jnp.mean(gap),
        "reward/chosen": jnp.mean(chosen),
        "reward/rejected": jnp.mean(rejected),
    }
    return loss, metrics


def ensemble_scores(scores, *, ddof=0):
    """Mean and spread of an ensemble's scores: `scores [E, B] -> (mean [B], std [B])`.

    The standard deviation across members is the ensemble's uncertainty (Coste et al. 2023,
    arXiv:2310.02743). `ddof=0` gives the population std, `ddof=1` the unbiased one.
    """
    check_rank(scores, 2, "scores")
    check_floating(scores, "scores")
    members = jnp.shape(scores)[0]
    if not 0 <= ddof < members:
        raise ValueError(f"`ddof` must be in [0, {members}) for an ensemble of {members}, got {ddof}")
    scores = jnp.asarray(scores, _compute_dtype(scores))
    return jnp.mean(scores, axis=0), jnp.std(scores, axis=0, ddof=ddof)


def ensemble_reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef=0.0):
    """Mean over members of `reward_model_loss`, for an ensemble trained on the same pairs.

    Args:
      chosen_rewards: `[E, B]` scores of the chosen responses from each of E members.
      rejected_rewards: `[E, B]` scores of the rejected responses.
      margin: None, a scalar, `[B]` (shared by all members) or `[E, B]`.
      center_coef: weight of each member's centering term.

    Returns:
      `(loss, metrics)`: the `reward/*` metrics of `reward_model_loss` averaged over members,
      plus `reward/ensemble_std`, the across-member std of the scores (population std)
      averaged over the chosen and rejected responses of the batch.
    """
    for name, value in (("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards)):
        check_rank(value, 2, name)
        check_floating(value, name)
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    margin_axis = None
    if margin is not None:
        check_rank(margin, (0, 1, 2), "margin")
        if jnp.ndim(margin) == 2:
            check_same_shape(chosen_rewards=chosen_rewards, margin=margin)
            margin_axis = 0

    def member_loss(chosen, rejected, member_margin):
        return reward_model_loss(chosen, rejected, margin=member_margin, center_coef=center_coef)

    losses, member_metrics = jax.vmap(member_loss, in_axes=(0, 0, margin_axis))(
        chosen_rewards, rejected_rewards, margin
    )
    loss = jnp.mean(losses)
    metrics = {name: jnp.mean(value) for name, value in member_metrics.items()}
    metrics["reward/loss"] = loss
    _, chosen_std = ensemble_scores(chosen_rewards)
    _, rejected_std = ensemble_scores(rejected_rewards)
    metrics["reward/ensemble_std"] = 0.5 * (jnp.mean(chosen_std) + jnp.mean(rejected_std))
    return loss, metrics
