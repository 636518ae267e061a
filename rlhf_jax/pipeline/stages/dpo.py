"""`rlhf-jax dpo`: preference optimisation (DPO, IPO and the other `dpo.loss_type`s, SimPO,
CPO, ORPO via `dpo.kind`) of a policy on prompt/chosen/rejected pairs.

    rlhf-jax dpo --config configs/dpo.yaml model.path=runs/sft/model
    rlhf-jax dpo --config configs/ipo.yaml model.path=runs/sft/model

The reference policy (`reference`, default `model.path`) is frozen, so its log-probs of every
training and held-out pair are computed once, before training, in fixed-shape batches; each
training batch then carries them (`PreferenceBatch.ref_logps`) and the step runs one
forward/backward pass of the policy only. Held-out pairs give `eval/dpo/accuracy` (share of
pairs with implicit reward `beta*c > beta*r`; 0 while the policy equals its reference, as every
implicit reward is then 0), `eval/dpo/margin` (mean `beta*(c - r)`, in units of `dpo.beta`),
and `eval/dpo/policy_accuracy` (share of pairs whose chosen answer the policy itself gives the
higher log-probability), next to `eval/dpo/reference_accuracy`, the same share for the
reference (the start's value, for comparison). The reference-free kinds (simpo, cpo, orpo)
train without one, but their held-out `c` and `r` are still log-ratios to the starting policy
(scored once before training), so `eval/dpo/accuracy` means the same for every kind. With `lora`, the reference
is the loaded model itself (the base with its adapters disabled), so no second copy is read.

`dpo.kind: kto` trains KTO on unpaired rows (`rlhf_jax.pipeline.unpaired`): labelled
completions (`prompt`, `completion`, bool `label`) or pairs split into a desirable and an
undesirable row; each row's reference log-probs and those of its mismatched completion (for
KTO's reference point) are computed once, as for pairs. Held-out rows give
`eval/kto/accuracy` (share of rows whose implicit reward `beta*h` has the sign of its label:
positive for desirable, negative for undesirable; 0 at the start), `eval/kto/margin` (mean
reward of the desirable rows minus that of the undesirable ones), `eval/kto/rewards_chosen`,
`eval/kto/rewards_rejected` and `eval/kto/kl` (the reference point `z0` over the held-out rows).
"""
from __future__ import annotations

import logging

import jax
import numpy as np

from rlhf_jax.pipeline.stage_configs import DPOConfig, load_stage_config
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.pipeline.stages.lora import check_lora_reference
from rlhf_jax.training.batches import KTOBatch, PreferenceBatch
from rlhf_jax.training.preference_step import pair_logps, preference_step
from rlhf_jax.training.lora_state import inference_model

logger = logging.getLogger(__name__)


def make_pair_logps(apply_fn):
    """Jitted `(params, PreferenceBatch) -> (chosen logps [B], rejected logps [B])` (sums;
    each pair's prompt runs once)."""

    def logps(params, batch):
        chosen, rejected = pair_logps(apply_fn, params, batch)
        return chosen.logps, rejected.logps

    return jax.jit(logps)


def dataset_logps(pair_logps, params, data, batch_size: int, mesh, max_batches=None):
    """Summed log-probs `(chosen [N], rejected [N])` of every row of `data`, in row order."""
    return skeletons.pair_values(pair_logps, params, data, batch_size, mesh, max_batches)


def rows_of(batch: dict, values: np.ndarray) -> np.ndarray:
    """`values[row]` for each row of `batch` (by its `row_index`), 0 on pad rows; float32."""
    rows = batch["row_index"]
    return np.where(rows >= 0, values[np.maximum(rows, 0)], 0.0).astype(np.float32)


def with_reference(batch: dict, ref_chosen: np.ndarray, ref_rejected: np.ndarray) -> PreferenceBatch:
    """A training batch with the precomputed reference log-probs of its rows (0 on pad rows)."""
    ref = np.stack([rows_of(batch, ref_chosen), rows_of(batch, ref_rejected)], axis=1)
    return PreferenceBatch.from_arrays(batch).replace(ref_logps=ref)


def kto_batch(batch: dict, ref_logps: np.ndarray | None, ref_kl_logps: np.ndarray | None) -> KTOBatch:
    """A KTO training batch (`rlhf_jax.pipeline.unpaired` rows: slot 0 the completion, slot 1
    the mismatched one) with the precomputed reference log-probs of its rows (0 on pad rows)."""
    pick = lambda x: x[:, :1]
    fields = dict(prompt_ids=batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
                  response_ids=pick(batch["response_ids"]), response_mask=pick(batch["response_mask"]),
                  kl_response_ids=batch["response_ids"][:, 1:], kl_response_mask=batch["response_mask"][:, 1:],
                  is_desirable=batch["is_desirable"])
    if ref_logps is not None:
        fields["ref_logps"], fields["ref_kl_logps"] = rows_of(batch, ref_logps), rows_of(batch, ref_kl_logps)
    return KTOBatch(**fields)


def kto_eval_metrics(logps, kl_logps, desirable, beta: float) -> dict:
    """Held-out KTO metrics from the implicit rewards `beta * h` of labelled rows (`logps`,
    `kl_logps`: policy minus reference log-probs of each row and of its mismatched pair)."""
    rewards = beta * logps
    desirable = desirable > 0
    mean = lambda x: float(np.mean(x)) if x.size else 0.0
    chosen, rejected = mean(rewards[desirable]), mean(rewards[~desirable])
    return {"eval/kto/accuracy": mean(np.where(desirable, rewards > 0, rewards < 0)),
            "eval/kto/margin": chosen - rejected, "eval/kto/rewards_chosen": chosen,
            "eval/kto/rewards_rejected": rejected, "eval/kto/kl": max(mean(kl_logps), 0.0)}


def check_kto_balance(is_desirable: np.ndarray, loss) -> None:
    """One warning line when `w_d * n_d / (w_u * n_u)` lies outside [1, 4/3], the range the KTO
    paper recommends (Ethayarajh et al. 2024, section 4.2), with the `dpo.desirable_weight`
    that brings it to 1."""
    desirable = int(np.sum(is_desirable > 0))
    undesirable = len(is_desirable) - desirable
    if not desirable or not undesirable:
        logger.warning("the KTO rows are all %s; KTO needs both desirable and undesirable completions",
                       "desirable" if desirable else "undesirable")
        return
    ratio = loss.desirable_weight * desirable / (loss.undesirable_weight * undesirable)
    if not 1.0 <= ratio <= 4.0 / 3.0:
        suggested = loss.undesirable_weight * undesirable / desirable
        logger.warning("KTO: desirable_weight * %d desirable / (undesirable_weight * %d undesirable) = %.3g, "
                       "outside the paper's [1, 4/3]; e.g. dpo.desirable_weight=%.3g", desirable, undesirable,
                       ratio, suggested)


def train_dpo(config: DPOConfig, *, resume: bool = False) -> dict:
    kto = config.dpo.kind == "kto"
    setup = skeletons.open_supervised_stage(config, kind="kto" if kto else "preference", stage="dpo", resume=resume,
                                            why="KTO needs preference pairs or labelled completions" if kto
                                            else "DPO needs preference pairs")
    data, eval_data, mesh = setup.data, setup.eval_data, setup.mesh
    if kto:
        check_kto_balance(data.arrays["is_desirable"], config.dpo)
    module, params = stage_setup.build_model(config.model, setup.tokenizer, stage_setup.rng_key(config.seed, 0))
    pair_logps = make_pair_logps(module.apply)
    # reference log-probs of each row's two responses: (chosen, rejected) of a pair, or a KTO
    # row's (completion, mismatched completion)
    train_ref = eval_ref = None
    if config.dpo.needs_reference:
        reference_path = config.reference or config.model.path
        if config.lora is not None:  # the base with its adapters disabled: the loaded weights themselves
            check_lora_reference(config, config.model.path)
            ref_params = params
        elif config.reference:
            _, ref_params = stage_setup.load_reference(config.reference, module, setup.tokenizer)
        elif reference_path:
            _, ref_params = stage_setup.load_folder(reference_path, head="lm", key="reference")
        else:  # a fresh model is its own reference
            ref_params = params
        batch_size = config.eval.batch_size
        train_ref = dataset_logps(pair_logps, ref_params, data, batch_size, mesh)
        if eval_data is not None:
            eval_ref = dataset_logps(pair_logps, ref_params, eval_data, batch_size, mesh, config.eval.max_batches)
        del ref_params
    elif eval_data is not None:  # reference-free kinds: held-out rewards relative to the starting policy
        eval_ref = dataset_logps(pair_logps, params, eval_data, config.eval.batch_size, mesh, config.eval.max_batches)
    state, step = skeletons.supervised_state_and_step(config, module, params, mesh, preference_step,
                                                   config=config.dpo)
    del params
    eval_model = inference_model(module, state)[0]
    eval_logps = pair_logps if eval_model is module else make_pair_logps(eval_model.apply)

    def prepare(batch):
        if kto:
            return stage_setup.place(kto_batch(batch, *train_ref), mesh)
        if train_ref is None:
            return stage_setup.place(PreferenceBatch.from_arrays(batch), mesh)
        return stage_setup.place(with_reference(batch, *train_ref), mesh)

    evaluate = None
    if eval_data is not None:
        beta = config.dpo.beta

        def evaluate(params):
            chosen, rejected = dataset_logps(eval_logps, params, eval_data,
                                             config.eval.batch_size, mesh, config.eval.max_batches)
            if kto:  # slot 0: the row's completion, slot 1: its mismatched pair
                desirable = eval_data.arrays["is_desirable"][:len(chosen)]
                return kto_eval_metrics(chosen - eval_ref[0], rejected - eval_ref[1], desirable, beta)
            metrics = {"eval/dpo/policy_accuracy": float(np.mean(chosen > rejected)),
                       "eval/dpo/reference_accuracy": float(np.mean(eval_ref[0] > eval_ref[1]))}
            chosen, rejected = chosen - eval_ref[0], rejected - eval_ref[1]
            return {"eval/dpo/accuracy": float(np.mean(beta * chosen > beta * rejected)),
                    "eval/dpo/margin": float(np.mean(beta * (chosen - rejected))), **metrics}

    kind = config.dpo.kind
    progress_keys = (("kto/loss", "kto/margin", "eval/kto/accuracy") if kto
                     else (f"{kind}/loss", f"{kind}/accuracy", "eval/dpo/accuracy"))
    return skeletons.run_supervised_stage(
        "dpo", config, setup, module, state, step, resume=resume, prepare_batch=prepare, evaluate=evaluate,
        description=kind, progress_keys=progress_keys)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax dpo` entry point."""
    return train_dpo(load_stage_config(DPOConfig, config_path, overrides), resume=resume)
