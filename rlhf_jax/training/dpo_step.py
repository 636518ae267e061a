"""Preference-optimisation step: the DPO family, SimPO, CPO, ORPO and KTO.

One step function, `dpo_step(state, batch, *, config, ref_params=None, ...)`, trains a
`CausalLM` policy on preference data; `config.kind` picks the loss:

| kind | loss (see `rlhf_jax.losses`) | batch | reference |
|---|---|---|---|
| dpo | `dpo_loss(loss_type=...)`, every type of `DPO_LOSS_TYPES` | PreferenceBatch | yes |
| simpo | `simpo_loss` on per-token mean log-probs (Meng et al. 2024, arXiv:2405.14734) | PreferenceBatch | no |
| cpo | `cpo_loss` on summed log-probs + chosen NLL (Xu et al. 2024, arXiv:2401.08417) | PreferenceBatch | no |
| orpo | `orpo_loss` on mean log-probs + chosen NLL (Hong et al. 2024, arXiv:2403.07691) | PreferenceBatch | no |
| kto | `kto_loss` on unpaired completions (Ethayarajh et al. 2024, arXiv:2402.01306) | KTOBatch | yes |

Policy log-probs are response-token sums (`policy_logps`); chosen and rejected rows run
through ONE forward pass. The lengths that `ipo` and `sigmoid_norm` divide by are the counted
response tokens of each row. Reference log-probs come from the batch when it holds them
(`precompute_reference_logps`, once over the dataset: the reference is frozen, so this
removes a forward pass per step), else from a forward pass of `ref_params` in the step under
`stop_gradient`. Both give the same update.

Usage (the caller jits; the state is donated, the reference parameters are not):

    step = jax.jit(dpo_step, donate_argnames=("state",),
                   static_argnames=("config", "response_window", "prompt_window", "num_microbatches"))
    state, metrics = step(state, batch, config=PreferenceLossConfig(beta=0.1), ref_params=ref)

With `prompt_window=P` (and a `response_window`), pairs run their shared prompt once
(`policy_logps.shared_prompt_logps`): the same numbers with less work, for prompts of at
most P tokens; `train/prompt_not_shared` (should be 0) flags rows that break that.

Batch-coupled losses (`aot`, `aot_unpaired` sort over the batch; KTO's reference point is a
batch mean) see one microbatch at a time under `num_microbatches > 1`; under `shard_map`
KTO averages its reference point over `axis_name`, `aot` sorts per shard.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlhf_jax.losses.kto import kto_loss
from rlhf_jax.losses.preference import DIVERGENCES, DPO_LOSS_TYPES, dpo_loss
from rlhf_jax.losses.preference_types import SMOOTHED_LOSS_TYPES
from rlhf_jax.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from rlhf_jax.ops.checks import check_in, check_positive
from rlhf_jax.training.batches import KTOBatch, PreferenceBatch
from rlhf_jax.training.policy_logps import paired_sequence_logps, sequence_logps, shared_prompt_logps
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
    gamma: float = 0.5  # SimPO target reward margin
    nll_coef: float = 1.0  # CPO weight of the chosen NLL
    lam: float = 0.1  # ORPO weight of the odds-ratio term
    desirable_weight: float = 1.0  # KTO w_d
    undesirable_weight: float = 1.0  # KTO w_u

    def __post_init__(self):
        check_in(self.kind, PREFERENCE_KINDS, "kind")
        check_in(self.loss_type, DPO_LOSS_TYPES, "loss_type")
        check_in(self.divergence, DIVERGENCES, "divergence")
        check_positive(self.beta, "beta")
        if self.label_smoothing and (
            self.kind in ("orpo", "kto") or (self.kind == "dpo" and self.loss_type not in SMOOTHED_LOSS_TYPES)
        ):
            used_by = f"loss_type={self.loss_type!r}" if self.kind == "dpo" else f"kind={self.kind!r}"
            raise ValueError(f"`label_smoothing` is not used by {used_by}; got {self.label_smoothing}")

    @property
    def needs_reference(self) -> bool:
        return self.kind in REFERENCE_KINDS


def pair_logps(apply_fn, params, batch: PreferenceBatch, *, response_window=None, prompt_window=None):
    """Chosen and rejected `SequenceLogps` of a PreferenceBatch in one forward pass, and the
    `[B]` not-shared flag of the shared-prompt path (None without `prompt_window`)."""
    chosen = (batch.chosen_input_ids, batch.chosen_attention_mask, batch.chosen_loss_mask)
    rejected = (batch.rejected_input_ids, batch.rejected_attention_mask, batch.rejected_loss_mask)
    if prompt_window is None:
        return (*paired_sequence_logps(apply_fn, params, chosen, rejected, response_window=response_window), None)
    if response_window is None:
        raise ValueError("`prompt_window` needs a `response_window` (the responses' padded length)")
    return shared_prompt_logps(apply_fn, params, chosen, rejected, prompt_window=prompt_window,
                               response_window=response_window)


def reference_logps(apply_fn, ref_params, batch, *, response_window=None, prompt_window=None):
    """Reference log-probs of a batch, under `stop_gradient`.

    PreferenceBatch -> `(ref_chosen [B], ref_rejected [B])` from one forward pass of 2B rows
    (with `prompt_window`, of B prompts and 2B responses); KTOBatch -> `(ref_logps [B],
    ref_kl_logps [B] or None)`.
    """
    if isinstance(batch, KTOBatch):
        main = sequence_logps(apply_fn, ref_params, batch.input_ids, batch.attention_mask,
                              batch.loss_mask, response_window=response_window).logps
        kl = None
        if batch.has_kl_pairs:
            kl = sequence_logps(apply_fn, ref_params, batch.kl_input_ids, batch.kl_attention_mask,
                                batch.kl_loss_mask, response_window=response_window).logps
        return jax.lax.stop_gradient((main, kl))
    chosen, rejected, _ = pair_logps(apply_fn, ref_params, batch, response_window=response_window,
                                      prompt_window=prompt_window)
    return jax.lax.stop_gradient((chosen.logps, rejected.logps))


def with_reference_logps(apply_fn, ref_params, batch, *, response_window=None, prompt_window=None):
    """`batch` with its reference log-prob fields filled from `ref_params`."""
    first, second = reference_logps(apply_fn, ref_params, batch, response_window=response_window,
                                    prompt_window=prompt_window)
    if isinstance(batch, KTOBatch):
        return batch.replace(ref_logps=first, ref_kl_logps=second)
    return batch.replace(ref_chosen_logps=first, ref_rejected_logps=second)


def precompute_reference_logps(apply_fn, ref_params, batches, *, response_window=None, prompt_window=None):
    """Fill the reference log-probs of every batch once (one compiled forward per shape).

    Returns a list of batches with `ref_chosen_logps`/`ref_rejected_logps` (or `ref_logps`,
    `ref_kl_logps`) set; `dpo_step` then skips the reference forward pass. To keep them for a
    whole dataset, iterate it in a fixed order and store the arrays by row.
    """
    fill = jax.jit(lambda params, batch: with_reference_logps(
        apply_fn, params, batch, response_window=response_window, prompt_window=prompt_window))
    return [fill(ref_params, batch) for batch in batches]


def _window_metric(*logps):
    outside = jnp.concatenate([x.outside_window for x in logps])
    return {"train/tokens_outside_window": jnp.mean(outside)}


def preference_loss(apply_fn, params, batch, *, config: PreferenceLossConfig, response_window=None,
                    prompt_window=None, axis_name=None):
    """`(loss, metrics)` of `config.kind` on a batch whose reference log-probs (if the kind
    needs them) are already in the batch."""
    if config.kind == "kto":
        policy = sequence_logps(apply_fn, params, batch.input_ids, batch.attention_mask,
                                batch.loss_mask, response_window=response_window)
        kl_policy = None
        if batch.has_kl_pairs:  # z0 is detached, so these rows need no backward pass
            kl_policy = jax.lax.stop_gradient(sequence_logps(
                apply_fn, params, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask,
                response_window=response_window).logps)
        loss, metrics = kto_loss(
            policy.logps, batch.ref_logps, batch.is_desirable, beta=config.beta,
            desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
            kl_policy_logps=kl_policy, kl_ref_logps=batch.ref_kl_logps, axis_name=axis_name,
        )
        return loss, {**metrics, **(_window_metric(policy) if response_window else {})}

    chosen, rejected, not_shared = pair_logps(apply_fn, params, batch, response_window=response_window,
                                                  prompt_window=prompt_window)
    if config.kind == "dpo":
        loss, metrics = dpo_loss(
            chosen.logps, rejected.logps, batch.ref_chosen_logps, batch.ref_rejected_logps,
            beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing,
            chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths,
            divergence=config.divergence, alpha=config.alpha, discopop_tau=config.discopop_tau,
        )
    elif config.kind == "simpo":
        loss, metrics = simpo_loss(chosen.mean_logps, rejected.mean_logps, beta=config.beta,
                                   gamma=config.gamma, label_smoothing=config.label_smoothing)
    elif config.kind == "cpo":
        loss, metrics = cpo_loss(chosen.logps, rejected.logps, -chosen.mean_logps, beta=config.beta,
                                 nll_coef=config.nll_coef, label_smoothing=config.label_smoothing)
    else:  # orpo
        loss, metrics = orpo_loss(chosen.mean_logps, rejected.mean_logps, -chosen.mean_logps,
                                  lam=config.lam)
    metrics = {**metrics, **(_window_metric(chosen, rejected) if response_window else {})}
    if not_shared is not None:
        metrics["train/prompt_not_shared"] = jnp.mean(not_shared)
    return loss, metrics


def dpo_step(
    state,
    batch,
    *,
    config: PreferenceLossConfig,
    ref_params=None,
    response_window: int | None = None,
    prompt_window: int | None = None,
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
      response_window: None, or a static number of positions per row at which to project to
        the vocabulary (`policy_logps`); the reference forward uses it too.
      prompt_window: None, or a static P: run each pair's prompt (at most P tokens) once for
        both responses (needs `response_window`; not for KTO). Same numbers, less work.
      num_microbatches: split the batch into this many slices and accumulate gradients.
      axis_name: mapped axis name inside `shard_map`/`pmap`; None under `jit`.

    Returns:
      `(new_state, metrics)`: the loss's metrics (`dpo/*`, `simpo/*`, `cpo/*`, `orpo/*` or
      `kto/*`), `optim/grad_norm`, and with a window `train/tokens_outside_window` (mean per
      sequence of counted tokens the window missed; should be 0), with a prompt window
      `train/prompt_not_shared` (share of pairs whose prompt is longer than the window or
      differs between chosen and rejected; should be 0).
    """
    if not isinstance(config, PreferenceLossConfig):
        raise ValueError(f"`config` must be a PreferenceLossConfig, got {type(config).__name__}")
    expected = KTOBatch if config.kind == "kto" else PreferenceBatch
    if not isinstance(batch, expected):
        raise ValueError(f"kind={config.kind!r} needs a {expected.__name__}, got {type(batch).__name__}")
    if config.kind == "kto" and prompt_window is not None:
        raise ValueError("`prompt_window` is for paired preference data; KTO rows are unpaired")
    if config.kind == "kto":
        batch.validate()
    else:
        batch.validate(need_loss_masks=True)
    compute_reference = config.needs_reference and not batch.has_reference_logps
    if compute_reference and ref_params is None:
        raise ValueError(
            f"kind={config.kind!r} needs reference log-probs: pass `ref_params` or fill the batch "
            "with `precompute_reference_logps`"
        )

    def loss_fn(params, microbatch):
        if compute_reference:
            microbatch = with_reference_logps(state.apply_fn, ref_params, microbatch,
                                              response_window=response_window, prompt_window=prompt_window)
        return preference_loss(state.apply_fn, params, microbatch, config=config,
                               response_window=response_window, prompt_window=prompt_window,
                               axis_name=axis_name)

    return gradient_step(state, loss_fn, batch, num_microbatches=num_microbatches, axis_name=axis_name)


__all__ = [
    "PREFERENCE_KINDS", "PreferenceLossConfig", "pair_logps", "reference_logps", "with_reference_logps",
    "precompute_reference_logps", "preference_loss", "dpo_step",
]
