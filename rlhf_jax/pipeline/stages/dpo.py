"""`rlhf-jax dpo`: preference optimisation (DPO, IPO and the other `dpo.loss_type`s, SimPO,
CPO, ORPO via `dpo.kind`) of a policy on prompt/chosen/rejected pairs.

    rlhf-jax dpo --config configs/dpo.yaml model.path=runs/sft/model
    rlhf-jax dpo --config configs/ipo.yaml model.path=runs/sft/model

The reference policy (`reference`, default `model.path`) is frozen, so its log-probs of every
training and held-out pair are computed once, before training, in fixed-shape batches; each
training batch then carries them (`PreferenceBatch.ref_logps`) and the step runs one
forward/backward pass of the policy only. Held-out pairs give `eval/dpo/accuracy` (share of
pairs with implicit reward `beta*c > beta*r`; 0 while the policy equals its reference, as every
implicit reward is then 0), `eval/dpo/margin`, and `eval/dpo/policy_accuracy` (share of pairs
whose chosen answer the policy itself gives the higher log-probability), next to
`eval/dpo/reference_accuracy`, the same share for the reference (the start's value, for
comparison). With `lora`, the reference
is the loaded model itself (the base with its adapters disabled), so no second copy is read.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.pipeline.stage_configs import DPOConfig, load_stage_config
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.pipeline.stages.lora import check_lora_reference
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.preference_step import pair_logps, preference_step
from rlhf_jax.training.lora_state import inference_model


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


def with_reference(batch: dict, ref_chosen: np.ndarray, ref_rejected: np.ndarray) -> PreferenceBatch:
    """A training batch with the precomputed reference log-probs of its rows (0 on pad rows)."""
    rows = batch["row_index"]
    real = rows >= 0
    safe = np.where(real, rows, 0)
    ref = np.stack([ref_chosen[safe], ref_rejected[safe]], axis=1)
    return PreferenceBatch.from_arrays(batch).replace(
        ref_logps=np.where(real[:, None], ref, 0.0).astype(np.float32))


def train_dpo(config: DPOConfig, *, resume: bool = False) -> dict:
    setup = skeletons.open_supervised_stage(config, kind="preference", stage="dpo", resume=resume,
                                            why="DPO needs preference pairs")
    data, eval_data, mesh = setup.data, setup.eval_data, setup.mesh
    module, params = stage_setup.build_model(config.model, setup.tokenizer, stage_setup.rng_key(config.seed, 0))
    pair_logps = make_pair_logps(module.apply)
    ref_chosen = ref_rejected = eval_ref = None
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
        ref_chosen, ref_rejected = dataset_logps(pair_logps, ref_params, data, batch_size, mesh)
        if eval_data is not None:
            eval_ref = dataset_logps(pair_logps, ref_params, eval_data, batch_size, mesh, config.eval.max_batches)
        del ref_params
    state, step = skeletons.supervised_state_and_step(config, module, params, mesh, preference_step,
                                                   config=config.dpo)
    del params
    eval_model = inference_model(module, state)[0]
    eval_logps = pair_logps if eval_model is module else make_pair_logps(eval_model.apply)

    def prepare(batch):
        if ref_chosen is None:
            return stage_setup.place(PreferenceBatch.from_arrays(batch), mesh)
        return stage_setup.place(with_reference(batch, ref_chosen, ref_rejected), mesh)

    evaluate = None
    if eval_data is not None:
        beta = config.dpo.beta

        def evaluate(params):
            chosen, rejected = dataset_logps(eval_logps, params, eval_data,
                                             config.eval.batch_size, mesh, config.eval.max_batches)
            metrics = {"eval/dpo/policy_accuracy": float(np.mean(chosen > rejected))}
            if eval_ref is not None:
                metrics["eval/dpo/reference_accuracy"] = float(np.mean(eval_ref[0] > eval_ref[1]))
                chosen, rejected = chosen - eval_ref[0], rejected - eval_ref[1]
            return {"eval/dpo/accuracy": float(np.mean(beta * chosen > beta * rejected)),
                    "eval/dpo/margin": float(np.mean(beta * (chosen - rejected))), **metrics}

    kind = config.dpo.kind
    return skeletons.run_supervised_stage(
        "dpo", config, setup, module, state, step, resume=resume, prepare_batch=prepare, evaluate=evaluate,
        description=kind, progress_keys=(f"{kind}/loss", f"{kind}/accuracy", "eval/dpo/accuracy"))


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax dpo` entry point."""
    return train_dpo(load_stage_config(DPOConfig, config_path, overrides), resume=resume)
