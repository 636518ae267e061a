"""Per-pair formulas of the DPO family and the f-divergence transform of log-ratios.

`dpo_loss` (in `preference.py`) validates its inputs, builds the log-ratios and calls
`pair_losses` here. Notation (see docs/numerics.md): `c` and `r` are the chosen and rejected
log-ratios `log pi(y) - log pi_ref(y)`, `d = c - r`, `eps` the label smoothing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DPO_LOSS_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

# Loss types that read `label_smoothing`; the others reject a nonzero value.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")

# Loss types that compare per-token mean log-ratios and so need the response lengths.
LENGTH_NORMALISED_LOSS_TYPES = ("ipo", "sigmoid_norm")

# Label smoothing used by `exo_pair` when none is given: its loss has a `log eps` term.
EXO_DEFAULT_LABEL_SMOOTHING = 1e-3

# Largest exponent fed to `exp` by the forward-KL and alpha-divergence transforms: exp(40)
# ~ 2e17 keeps even the squared losses (ipo, sppo_hard) finite in float32.
MAX_DIVERGENCE_EXPONENT = 40.0


def smoothed_logistic_loss(logits, label_smoothing):
    """`-(1 - eps) * logsig(z) - eps * logsig(-z)`: logistic loss with flipped-label noise eps."""
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(
        -logits
    )


def divergence_transform(logratio, divergence: str, alpha=0.5):
    """`f'(u)` of an f-divergence, written in `x = log u` (f-DPO, Wang et al. 2023, arXiv:2309.16240).

    f-DPO replaces the log-ratio `x` in the implicit reward by `f'(exp(x))` (up to constants,
    which cancel in `c - r`):

    | divergence | `f'(u)` in `x = log u` |
    |---|---|
    | reverse_kl | `x` (DPO) |
    | forward_kl | `1 - exp(-x)` |
    | js | `log 2 + logsig(x)` (= `log(2u / (1 + u))`) |
    | alpha | `(exp((alpha - 1) * x) - 1) / (alpha - 1)`, 0 < alpha < 1 |

    The alpha family tends to reverse KL as alpha -> 1 and equals forward KL at alpha = 0.
    The paper writes it as `(1 - u^-a) / a`, i.e. `a = 1 - alpha` here; both agree at the
    default alpha = 0.5. Exponents are clamped at `MAX_DIVERGENCE_EXPONENT` so very negative
    log-ratios give large but finite values (with zero gradient past the clamp).
    """
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return -jnp.expm1(jnp.minimum(-logratio, MAX_DIVERGENCE_EXPONENT))
    if divergence == "js":
        return math.log(2.0) + jax.nn.log_sigmoid(logratio)
    if divergence == "alpha":
        exponent = jnp.minimum((alpha - 1.0) * logratio, MAX_DIVERGENCE_EXPONENT)
        return jnp.expm1(exponent) / (alpha - 1.0)
    raise ValueError(f"`divergence` must be one of {sorted(DIVERGENCES)}, got {divergence!r}")


def pair_losses(
    loss_type: str,
    chosen_logratios,
    rejected_logratios,
    *,
    beta,
    label_smoothing,
    discopop_tau,
    policy_margins=None,
    ref_margins=None,
):
    """Per-pair loss `[B]` of one DPO-family `loss_type` (formulas in `dpo_loss`'s docstring).

    Args:
      loss_type: one of `DPO_LOSS_TYPES`.
      chosen_logratios: `c` `[B]`, already divergence-transformed (and per-token means for
        `ipo` and `sigmoid_norm`).
      rejected_logratios: `r` `[B]`, likewise.
      beta: inverse temperature of the implicit reward.
      label_smoothing: `eps` for the smoothed types; already defaulted for `exo_pair`.
      discopop_tau: temperature of the DiscoPOP blending weight.
      policy_margins: `log pi(y_w) - log pi(y_l)` `[B]`, read only by `aot`.
      ref_margins: `log pi_ref(y_w) - log pi_ref(y_l)` `[B]`, read only by `aot`.
    """
    c, r, eps = chosen_logratios, rejected_logratios, label_smoothing
    logits = beta * (c - r)
    if loss_type == "sigmoid":
        return smoothed_logistic_loss(logits, eps)
    if loss_type == "robust":
        unbiased = -(1.0 - eps) * jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits)
        return unbiased / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - logits)
    if loss_type == "ipo":
        return (c - r - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "exo_pair":
        # KL(q_theta || q_data) between the 2-way softmax of the implicit rewards and the
        # smoothed label distribution (1 - eps, eps); written with log-sigmoids for stability.
        log_q_chosen = jax.nn.log_sigmoid(logits)
        log_q_rejected = jax.nn.log_sigmoid(-logits)
        return jnp.exp(log_q_chosen) * (log_q_chosen - jnp.log1p(-eps)) + jnp.exp(log_q_rejected) * (
            log_q_rejected - jnp.log(eps)
        )
    if loss_type == "nca_pair":
        return (
            -jax.nn.log_sigmoid(beta * c)
            - 0.5 * jax.nn.log_sigmoid(-beta * c)
            - 0.5 * jax.nn.log_sigmoid(-beta * r)
        )
    if loss_type == "bco_pair":
        return -jax.nn.log_sigmoid(beta * c) - jax.nn.log_sigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1.0 / (2.0 * beta)) ** 2 + (r + 1.0 / (2.0 * beta)) ** 2
    if loss_type == "aot":
        delta = jnp.sort(policy_margins) - jnp.sort(ref_margins)
        return smoothed_logistic_loss(beta * delta, eps)
    if loss_type == "aot_unpaired":
        delta = jnp.sort(c) - jnp.sort(r)
        return smoothed_logistic_loss(beta * delta, eps)
    if loss_type == "apo_zero":
        return 1.0 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
    if loss_type == "apo_down":
        return jax.nn.sigmoid(beta * c) + 1.0 - jax.nn.sigmoid(logits)
    if loss_type == "discopop":
        # (1 - m) * (-logsig(z)) + m * exp(-z) with m = sigma(z / tau); the second term is
        # exp(logsig(z / tau) - z), which stays finite where exp(-z) alone would overflow.
        blend_logistic = jax.nn.sigmoid(-logits / discopop_tau)
        exponential = jnp.exp(jax.nn.log_sigmoid(logits / discopop_tau) - logits)
        return blend_logistic * -jax.nn.log_sigmoid(logits) + exponential
    if loss_type == "sigmoid_norm":
        return -jax.nn.log_sigmoid(logits)
    raise ValueError(f"`loss_type` must be one of {sorted(DPO_LOSS_TYPES)}, got {loss_type!r}")
