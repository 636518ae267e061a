"""Preference-optimisation step: the DPO family, SimPO, CPO, ORPO and KTO.

One step function, `preference_step(state, batch, *, config, ref_params=None, ...)`, trains a
`CausalLM` policy on preference data; `config.kind` picks the loss:

| kind | loss (see `rlhf_jax.losses`) | batch | reference |
|---|---|---|---|
| dpo | `dpo_loss(loss_type=...)`, every type of `DPO_LOSS_TYPES` | PreferenceBatch | yes |
| simpo | `simpo_loss` on per-token mean log-probs (Meng et al. 2024, arXiv:2405.14734) | PreferenceBatch | no |
| cpo | `cpo_loss` on summed log-probs + chosen NLL (Xu et al. 2024, arXiv:2401.08417) | PreferenceBatch | no |
| orpo | `orpo_loss` on mean log-probs + chosen NLL (Hong et al. 2024, arXiv:2403.07691) | PreferenceBatch | no |
| kto | `kto_loss` on unpaired completions (Ethayarajh et al. 2024, arXiv:2402.01306) | KTOBatch | yes |

Policy log-probs are response-token sums from the one log-prob path
(`training.logprobs.response_logprobs`): each pair's prompt runs once for both responses
(its keys and values shared, gradients through it) and only response positions are
projected to the vocabulary. The lengths that `ipo` and `sigmoid_norm` divide by are the
counted response tokens. Reference log-probs come from the batch when it holds them
(`precompute_reference_logps`, once over the dataset: the reference is frozen, so this
removes a forward pass per step), else from a forward pass of `ref_params` in the step under
`stop_gradient`. Both give the same update.

Usage (the caller jits; the state is donated, the reference parameters are not):

    step = jax.jit(preference_step, donate_argnames=("state",),
                   static_argnames=("config", "num_microbatches"))
    state, metrics = step(state, batch, config=PreferenceLossConfig(beta=0.1), ref_params=ref)

Batch-coupled losses (`aot`, `aot_unpaired` sort over the batch; KTO's reference point is a
batch mean) see one microbatch at a time under `num_microbatches > 1`; under `shard_map`
KTO averages its reference point over `axis_name`, `aot` sorts per shard.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.kto import kto_loss
from rlhf_jax.losses.preference import DIVERGENCES, DPO_LOSS_TYPES, check_dpo_options, dpo_loss
from rlhf_jax.losses.preference_types import SMOOTHED_LOSS_TYPES
from rlhf_jax.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from rlhf_jax.ops.checks import check_in, check_positive
from rlhf_jax.training.batches import KTOBatch, PreferenceBatch
from rlhf_jax.training.logprobs import LMBatch, response_logprobs
from rlhf_jax.training.step_runner import gradient_step

PREFERENCE_KINDS = ("dpo", "simpo", "cpo", "orpo", "kto")
REFERENCE_KINDS = ("dpo", "kto")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    """Which preference loss and its hyperparameters (frozen: a static `jit` argument)."""

    kind: str = "dpo"  # "dpo" | "simpo" | "cpo" | "orpo" | "kto"
    loss_type: str = "sigmoid"  # kind="dpo": one of DPO_LOSS_TYPES
    beta: float = 0.1  # inverse temperature (SimPO's paper uses 2.0-2.5)
    label_smoothing: float = 0.0  # dpo (smoothed types), simpo, cpo
    divergence: str = "reverse_kl"  # kind="dpo": f-DPO divergence
    alpha: float = 0.5  # alpha-divergence parameter
    discopop_tau: float = 0.05  # loss_type="discopop"
    target_margin: float = 0.5  # SimPO target reward margin
    nll_coef: float = 1.0  # CPO weight of the chosen NLL
    odds_ratio_coef: float = 0.1  # ORPO weight of the odds-ratio term
    desirable_weight: float = 1.0  # KTO w_d
    undesirable_weight: float = 1.0  # KTO w_u

    def __post_init__(self):
        """Every value in range, and no setting changed from its default that the chosen loss
        does not read (a sweep over `kind` with `loss_type=ipo` would train SimPO unnoticed)."""
        check_in(self.kind, PREFERENCE_KINDS, "kind")
        check_in(self.loss_type, DPO_LOSS_TYPES, "loss_type")
        check_in(self.divergence, DIVERGENCES, "divergence")
        used = self.used_settings()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name not in used and field.name != "kind" and value != field.default:
                used_by = f"loss_type={self.loss_type!r}" if self.kind == "dpo" else f"kind={self.kind!r}"
                raise ValueError(f"`{field.name}` is not used by {used_by}; got {value!r}")
        if self.kind == "dpo":
            check_dpo_options(self.loss_type, beta=self.beta, label_smoothing=self.label_smoothing,
                              divergence=self.divergence, alpha=self.alpha, discopop_tau=self.discopop_tau)
        check_positive(self.beta, "beta")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {self.label_smoothing}")
        for name in ("target_margin", "nll_coef", "odds_ratio_coef", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")

    def used_settings(self) -> set[str]:
        """The fields the loss of `kind` (and `loss_type`, `divergence`) reads."""
        if self.kind == "dpo":
            used = {"loss_type", "beta", "divergence"}
            used |= {"label_smoothing"} if self.loss_type in SMOOTHED_LOSS_TYPES else set()
            used |= {"alpha"} if self.divergence == "alpha" else set()
            return used | ({"discopop_tau"} if self.loss_type == "discopop" else set())
        return {"simpo": {"beta", "target_margin", "label_smoothing"}, "cpo": {"beta", "nll_coef", "label_smoothing"},
                "orpo": {"odds_ratio_coef"}, "kto": {"beta", "desirable_weight", "undesirable_weight"}}[self.kind]

    @property
    def needs_reference(self) -> bool:
        return self.kind in REFERENCE_KINDS


class SequenceLogps(NamedTuple):
    """Summed response log-probs and the counted tokens of each response."""

    logps: jax.Array  # [...] float32 sum over counted tokens of log p(token)
    lengths: jax.Array  # [...] float32 counted tokens

    @property
    def mean_logps(self) -> jax.Array:
        """Per-token mean log-prob `logps / max(lengths, 1)`."""
        return self.logps / jnp.maximum(self.lengths, 1.0)


def sequence_logps(apply_fn, params, batch: LMBatch) -> SequenceLogps:
    """`[B, N]` summed log-probs and lengths of the responses of an `LMBatch` (each prompt once)."""
    scored = response_logprobs(apply_fn, params, batch)
    return SequenceLogps(scored.sequence_sum(), scored.lengths())


def pair_logps(apply_fn, params, batch: PreferenceBatch):
    """Chosen and rejected `SequenceLogps` (`[B]` each) of a PreferenceBatch, from one forward
    pass that runs each pair's prompt once."""
    both = sequence_logps(apply_fn, params, batch)
    return SequenceLogps(*(x[:, 0] for x in both)), SequenceLogps(*(x[:, 1] for x in both))


def reference_logps(apply_fn, ref_params, batch):
    """Reference log-probs of a batch, under `stop_gradient`.

    PreferenceBatch -> `ref_logps [B, 2]` (chosen, rejected); KTOBatch -> `(ref_logps [B],
    ref_kl_logps [B] or None)`.
    """
    if isinstance(batch, KTOBatch):
        main = sequence_logps(apply_fn, ref_params, batch).logps[:, 0]
        kl = sequence_logps(apply_fn, ref_params, batch.kl_batch()).logps[:, 0] if batch.has_kl_pairs else None
        return jax.lax.stop_gradient((main, kl))
    return jax.lax.stop_gradient(sequence_logps(apply_fn, ref_params, batch).logps)


def with_reference_logps(apply_fn, ref_params, batch):
    """`batch` with its reference log-prob fields filled from `ref_params`."""
    if isinstance(batch, KTOBatch):
        main, kl = reference_logps(apply_fn, ref_params, batch)
        return batch.replace(ref_logps=main, ref_kl_logps=kl)
    return batch.replace(ref_logps=reference_logps(apply_fn, ref_params, batch))


def precompute_reference_logps(apply_fn, ref_params, batches):
    """Fill the reference log-probs of every batch once (one compiled forward per shape).

    Returns a list of batches with `ref_logps` (and for KTO `ref_kl_logps`) set;
    `preference_step` then skips the reference forward pass. To keep them for a whole
    dataset, iterate it in a fixed order and store the arrays by row.
    """
    fill = jax.jit(lambda params, batch: with_reference_logps(apply_fn, params, batch))
    return [fill(ref_params, batch) for batch in batches]


def preference_loss(apply_fn, params, batch, *, config: PreferenceLossConfig, axis_name=None):
    """`(loss, metrics)` of `config.kind` on a batch whose reference log-probs (if the kind
    needs them) are already in the batch."""
    if config.kind == "kto":
        policy = sequence_logps(apply_fn, params, batch).logps[:, 0]
        kl_policy = None
        if batch.has_kl_pairs:  # z0 is detached, so these rows need no backward pass
            kl_policy = jax.lax.stop_gradient(sequence_logps(apply_fn, params, batch.kl_batch()).logps[:, 0])
        return kto_loss(
            policy, batch.ref_logps, batch.is_desirable, beta=config.beta,
            desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
            kl_policy_logps=kl_policy, kl_ref_logps=batch.ref_kl_logps, axis_name=axis_name,
        )

    chosen, rejected = pair_logps(apply_fn, params, batch)
    if config.kind == "dpo":
        return dpo_loss(
            chosen.logps, rejected.logps, batch.ref_logps[:, 0], batch.ref_logps[:, 1],
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths,
            divergence=config.divergence, alpha=config.alpha, discopop_tau=config.discopop_tau,
        )
    if config.kind == "simpo":
        return simpo_loss(chosen.mean_logps, rejected.mean_logps, beta=config.beta,
                          target_margin=config.target_margin, label_smoothing=config.label_smoothing)
    if config.kind == "cpo":
        return cpo_loss(chosen.logps, rejected.logps, -chosen.mean_logps, beta=config.beta,
                        nll_coef=config.nll_coef, label_smoothing=config.label_smoothing)
    return orpo_loss(chosen.mean_logps, rejected.mean_logps, -chosen.mean_logps, odds_ratio_coef=config.odds_ratio_coef)


def preference_step(
    state,
    batch,
    *,
    config: PreferenceLossConfig,
    ref_params=None,
    num_microbatches: int = 1,
    axis_name=None,
):
    """One preference-optimisation update of a `CausalLM` train state.

    Args:
      state: `TrainState` with `apply_fn = CausalLM.apply` and the policy's params.
      batch: `PreferenceBatch` (kinds dpo/simpo/cpo/orpo) or `KTOBatch` (kind kto).
      config: `PreferenceLossConfig` (static).
      ref_params: frozen reference parameters; read only when the kind needs a reference and
        the batch holds no precomputed reference log-probs. Never differentiated or donated.
      num_microbatches: split the batch into this many slices and accumulate gradients.
      axis_name: mapped axis name inside `shard_map`/`pmap`; None under `jit`.

    Returns:
      `(new_state, metrics)`: the loss's metrics (`dpo/*`, `simpo/*`, `cpo/*`, `orpo/*` or
      `kto/*`) and `optim/grad_norm`.
    """
    if not isinstance(config, PreferenceLossConfig):
        raise ValueError(f"`config` must be a PreferenceLossConfig, got {type(config).__name__}")
    expected = KTOBatch if config.kind == "kto" else PreferenceBatch
    if not isinstance(batch, expected):
        raise ValueError(f"kind={config.kind!r} needs a {expected.__name__}, got {type(batch).__name__}")
    batch.validate()
    compute_reference = config.needs_reference and not batch.has_reference_logps
    if compute_reference and ref_params is None:
        raise ValueError(
            f"kind={config.kind!r} needs reference log-probs: pass `ref_params` or fill the batch "
            "with `precompute_reference_logps`"
        )

    def loss_fn(params, microbatch):
        if compute_reference:
            microbatch = with_reference_logps(state.apply_fn, ref_params, microbatch)
        return preference_loss(state.apply_fn, params, microbatch, config=config, axis_name=axis_name)

    return gradient_step(state, loss_fn, batch, num_microbatches=num_microbatches, axis_name=axis_name)


__all__ = [
    "PREFERENCE_KINDS", "PreferenceLossConfig", "SequenceLogps", "sequence_logps", "pair_logps",
    "reference_logps", "with_reference_logps", "precompute_reference_logps", "preference_loss",
    "preference_step",
]
