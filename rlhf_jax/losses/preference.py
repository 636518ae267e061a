"""Direct preference optimisation and its relatives, one `loss_type` per paper.

The per-pair formulas live in `preference_types.py`; this module validates the inputs, forms
the log-ratios, applies the optional f-divergence and reduces to `(loss, metrics)`.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp

from rlhf_jax.losses.preference_types import (
    DIVERGENCES,
    DPO_LOSS_TYPES,
    EXO_DEFAULT_LABEL_SMOOTHING,
    LENGTH_NORMALISED_LOSS_TYPES,
    SMOOTHED_LOSS_TYPES,
    divergence_transform,
    pair_losses,
)
from rlhf_jax.ops.checks import check_floating, check_in, check_nonempty, check_positive, check_rank, check_same_shape

__all__ = ["DPO_LOSS_TYPES", "DIVERGENCES", "check_dpo_options", "dpo_loss"]


def _is_static_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_dpo_options(loss_type: str, *, beta, label_smoothing, divergence: str, alpha, discopop_tau):
    """Raise ValueError naming the first `dpo_loss` option out of range or not supported by
    `loss_type` (static values only; traced ones are the caller's to vouch for); return the
    label smoothing `dpo_loss` uses (`exo_pair`'s default when 0)."""
    check_in(loss_type, DPO_LOSS_TYPES, "loss_type")
    check_in(divergence, DIVERGENCES, "divergence")
    check_positive(beta, "beta")
    check_positive(discopop_tau, "discopop_tau")
    eps = _check_label_smoothing(label_smoothing, loss_type)
    if divergence == "alpha" and _is_static_number(alpha) and not 0.0 < alpha < 1.0:
        raise ValueError(f"`alpha` must be in (0, 1) for divergence='alpha', got {alpha}")
    if loss_type == "aot" and divergence != "reverse_kl":
        raise ValueError(
            "loss_type='aot' sorts policy and reference margins rather than log-ratios, so it "
            f"supports only divergence='reverse_kl', got {divergence!r}"
        )
    return eps


def _check_label_smoothing(label_smoothing, loss_type: str):
    """Validate a static `label_smoothing` for `loss_type`; return the value to use."""
    if not _is_static_number(label_smoothing):
        return label_smoothing  # traced or array-valued: the caller vouches for its range
    eps = float(label_smoothing)
    upper, bound = (0.5, "[0, 0.5)") if loss_type == "robust" else (1.0, "[0, 1)")
    if not 0.0 <= eps < upper:
        raise ValueError(f"`label_smoothing` must be in {bound} for loss_type={loss_type!r}, got {eps}")
    if eps > 0.0 and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"`label_smoothing` is used only by loss types {list(SMOOTHED_LOSS_TYPES)}; "
            f"loss_type={loss_type!r} would ignore label_smoothing={eps}"
        )
    if loss_type == "exo_pair" and eps == 0.0:
        return EXO_DEFAULT_LABEL_SMOOTHING
    return eps


def _per_token(logratios, lengths):
    """Divide summed log-ratios by response lengths (an empty response counts as length 1)."""
    return logratios / jnp.maximum(lengths.astype(logratios.dtype), 1.0)


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta=0.1,
    loss_type: str = "sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    divergence: str = "reverse_kl",
    alpha=0.5,
    discopop_tau=0.05,
):
    """Preference loss of the DPO family on a batch of (chosen, rejected) pairs.

    With `c = log pi(y_w) - log pi_ref(y_w)`, `r = log pi(y_l) - log pi_ref(y_l)`,
    `d = c - r`, `eps = label_smoothing`, `|y|` the number of response tokens:

    | loss_type | per-pair loss | paper |
    |---|---|---|
    | sigmoid | `-(1-eps)*logsig(beta*d) - eps*logsig(-beta*d)`; eps = 0 is DPO, eps > 0 conservative DPO | Rafailov et al. 2023, arXiv:2305.18290; cDPO: Mitchell 2023 (note on DPO with noisy preferences) |
    | robust | `(-(1-eps)*logsig(beta*d) + eps*logsig(-beta*d)) / (1-2*eps)`, eps in [0, 0.5) | Chowdhury et al. 2024, arXiv:2403.00409 |
    | hinge | `relu(1 - beta*d)` (SLiC) | Zhao et al. 2023, arXiv:2305.10425 |
    | ipo | `(c/|y_w| - r/|y_l| - 1/(2*beta))**2` (tau = beta) | Azar et al. 2023, arXiv:2310.12036 |
    | exo_pair | `q_w*(log q_w - log(1-eps)) + q_l*(log q_l - log eps)`, `q_w = sigma(beta*d)`, `q_l = sigma(-beta*d)` | Ji et al. 2024, arXiv:2402.00856 |
    | nca_pair | `-logsig(beta*c) - 0.5*logsig(-beta*c) - 0.5*logsig(-beta*r)` | Chen et al. 2024, arXiv:2402.05369 |
    | bco_pair | `-logsig(beta*c) - logsig(-beta*r)` | Jung et al. 2024, arXiv:2404.04656 |
    | sppo_hard | `(c - 1/(2*beta))**2 + (r + 1/(2*beta))**2` | Wu et al. 2024, arXiv:2405.00675 |
    | aot | `delta = sort(log pi_w - log pi_l) - sort(log ref_w - log ref_l)` over the batch, then the sigmoid form on `beta*delta` | Melnyk et al. 2024, arXiv:2406.05882 |
    | aot_unpaired | `delta = sort(c) - sort(r)`, same form | Melnyk et al. 2024, arXiv:2406.05882 |
    | apo_zero | `1 - sigma(beta*c) + sigma(beta*r)` | D'Oosterlinck et al. 2024, arXiv:2408.06266 |
    | apo_down | `sigma(beta*c) + 1 - sigma(beta*d)` | D'Oosterlinck et al. 2024, arXiv:2408.06266 |
    | discopop | `z = beta*d`, `m = sigma(z/tau)`: `(1-m)*(-logsig(z)) + m*exp(-z)` | Lu et al. 2024, arXiv:2406.08414 |
    | sigmoid_norm | `-logsig(beta*(c/|y_w| - r/|y_l|))` (length-normalised DPO) | Lambert et al. 2024 (Tulu 3), arXiv:2411.15124 |

    The loss is the mean of the per-pair losses over the batch. `aot` and `aot_unpaired`
    sort across the batch, so under data parallelism they see only the batch they are given.
    `bco_pair` is the pairwise form without BCO's running reward shift.

    Divergence (f-DPO, Wang et al. 2023, arXiv:2309.16240): before the loss, `c` and `r` are
    replaced by `f'(exp(c))` and `f'(exp(r))` (`divergence_transform`): reverse_kl keeps them,
    forward_kl uses `1 - exp(-x)`, js `log 2 + logsig(x)`, alpha
    `(exp((alpha-1)*x) - 1)/(alpha-1)`. For `ipo` and `sigmoid_norm` the transform is applied
    to the per-token mean log-ratios. `aot` compares policy and reference margins, not
    log-ratios, and accepts only reverse_kl.

    Args:
      policy_chosen_logps: `[B]` summed response log-probs of the chosen responses under the
        policy.
      policy_rejected_logps: `[B]` the same for the rejected responses.
      ref_chosen_logps: `[B]` summed chosen log-probs under the frozen reference model.
      ref_rejected_logps: `[B]` summed rejected log-probs under the reference model.
      beta: inverse temperature of the implicit reward `beta * log(pi / pi_ref)`; > 0.
      loss_type: one of `DPO_LOSS_TYPES`.
      label_smoothing: `eps`, the assumed probability that a label is flipped. Read by
        sigmoid (cDPO), robust, exo_pair, aot and aot_unpaired; a nonzero value with any other
        type raises. `exo_pair` needs eps > 0 and uses 1e-3 when it is 0.
      chosen_lengths: `[B]` response token counts of the chosen responses; required by `ipo`
        and `sigmoid_norm`, ignored otherwise.
      rejected_lengths: `[B]` response token counts of the rejected responses, likewise.
      divergence: one of `DIVERGENCES`.
      alpha: alpha of the alpha-divergence, in (0, 1).
      discopop_tau: temperature of the DiscoPOP blending weight; > 0.

    Returns:
      `(loss, metrics)`. Metrics (plain, untransformed log-ratios): `dpo/loss`,
      `dpo/rewards_chosen` (mean `beta*c`), `dpo/rewards_rejected` (mean `beta*r`),
      `dpo/accuracy` (mean `beta*c > beta*r`), `dpo/margin` (mean `beta*(c - r)`),
      `dpo/logps_chosen`, `dpo/logps_rejected` (mean policy log-probs).
    """
    eps = check_dpo_options(loss_type, beta=beta, label_smoothing=label_smoothing, divergence=divergence,
                            alpha=alpha, discopop_tau=discopop_tau)
    logps = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    for name, value in logps.items():
        check_rank(value, 1, name)
        check_floating(value, name)
    check_same_shape(**logps)
    check_nonempty(policy_chosen_logps, "policy_chosen_logps")
    for name, value in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
        if value is None:
            if loss_type in LENGTH_NORMALISED_LOSS_TYPES:
                raise ValueError(
                    f"loss_type={loss_type!r} compares per-token mean log-ratios and needs "
                    "`chosen_lengths` and `rejected_lengths` ([B] response token counts); "
                    f"`{name}` is missing"
                )
            continue
        check_rank(value, 1, name)
        check_same_shape(policy_chosen_logps=policy_chosen_logps, **{name: value})

    dtype = jnp.promote_types(jnp.result_type(*logps.values()), jnp.float32)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = (
        jnp.asarray(value, dtype) for value in logps.values()
    )
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected

    chosen_inputs, rejected_inputs = chosen_logratios, rejected_logratios
    if loss_type in LENGTH_NORMALISED_LOSS_TYPES:
        chosen_inputs = _per_token(chosen_inputs, jnp.asarray(chosen_lengths))
        rejected_inputs = _per_token(rejected_inputs, jnp.asarray(rejected_lengths))
    chosen_inputs = divergence_transform(chosen_inputs, divergence, alpha)
    rejected_inputs = divergence_transform(rejected_inputs, divergence, alpha)

    losses = pair_losses(
        loss_type,
        chosen_inputs,
        rejected_inputs,
        beta=beta,
        label_smoothing=eps,
        discopop_tau=discopop_tau,
        policy_margins=policy_chosen - policy_rejected,
        ref_margins=ref_chosen - ref_rejected,
    )
    loss = jnp.mean(losses)

    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    metrics = {
        "dpo/loss": loss,
        "dpo/rewards_chosen": jnp.mean(chosen_rewards),
        "dpo/rewards_rejected": jnp.mean(rejected_rewards),
        "dpo/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(dtype)),
        "dpo/margin": jnp.mean(chosen_rewards - rejected_rewards),
        "dpo/logps_chosen": jnp.mean(policy_chosen),
        "dpo/logps_rejected": jnp.mean(policy_rejected),
    }
    return loss, metrics
