"""`rlhf-jax dpo`: preference optimisation (DPO, IPO and the other `dpo.loss_type`s, SimPO,
CPO, ORPO via `dpo.kind`) of a policy on prompt/chosen/rejected pairs.

    rlhf-jax dpo --config configs/dpo.yaml model.path=runs/sft/model
    rlhf-jax dpo --config configs/ipo.yaml model.path=runs/sft/model

The reference policy (`reference`, default `model.path`) is frozen, so its log-probs of every
training and held-out pair are computed once, before training, in fixed-shape batches; each
training batch then carries them (`PreferenceBatch.ref_chosen_logps`) and the step runs one
forward/backward pass of the policy only. Held-out pairs give `eval/dpo/accuracy` (share of
pairs with implicit reward `beta*c > beta*r`) and `eval/dpo/margin`.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.pipeline.data import BatchIterator, DataPosition, load_data
from rlhf_jax.pipeline.loop import compile_train_step, run_loop
from rlhf_jax.pipeline.recipes import DPOConfig, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.dpo_step import dpo_step
from rlhf_jax.training.policy_logps import paired_sequence_logps


def _pairs(batch):
    return ((batch.chosen_input_ids, batch.chosen_attention_mask, batch.chosen_loss_mask),
            (batch.rejected_input_ids, batch.rejected_attention_mask, batch.rejected_loss_mask))


def make_pair_logps(apply_fn, response_window=None):
    """Jitted `(params, PreferenceBatch) -> (chosen logps [B], rejected logps [B])` (sums)."""

    def logps(params, batch):
        chosen, rejected = paired_sequence_logps(apply_fn, params, *_pairs(batch),
                                                 response_window=response_window)
        return chosen.logps, rejected.logps

    return jax.jit(logps)


def dataset_logps(pair_logps, params, data, batch_size: int, mesh, max_batches=None):
    """Summed log-probs `(chosen [N], rejected [N])` of every row of `data`, in row order."""
    batches = BatchIterator(data, batch_size, shuffle=False, drop_last=False,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batches.restore(DataPosition())
    chosen, rejected = [], []
    limit = max_batches or batches.batches_per_epoch
    for _, batch in zip(range(limit), batches.epoch_batches()):
        keep = batch["example_mask"] > 0
        out = jax.device_get(pair_logps(params, common.place(PreferenceBatch.from_arrays(batch), mesh)))
        chosen.append(np.asarray(out[0])[keep])
        rejected.append(np.asarray(out[1])[keep])
    return np.concatenate(chosen), np.concatenate(rejected)


def with_reference(batch: dict, ref_chosen: np.ndarray, ref_rejected: np.ndarray) -> PreferenceBatch:
    """A training batch with the precomputed reference log-probs of its rows (0 on pad rows)."""
    rows = batch["row_index"]
    real = rows >= 0
    safe = np.where(real, rows, 0)
    return PreferenceBatch.from_arrays(batch).replace(
        ref_chosen_logps=np.where(real, ref_chosen[safe], 0.0).astype(np.float32),
        ref_rejected_logps=np.where(real, ref_rejected[safe], 0.0).astype(np.float32))


def train_dpo(config: DPOConfig, *, resume: bool = False) -> dict:
    output_dir = common.prepare_output_dir(config)
    tokenizer = common.stage_tokenizer(config.tokenizer, config.model.path)
    common.require(config.data.train_files, "data.train_files", "DPO needs preference pairs")
    data = load_data(config.data.train_files, tokenizer, config.data, kind="preference")
    eval_data = (load_data(config.data.eval_files, tokenizer, config.data, kind="preference")
                 if config.data.eval_files else None)
    mesh = common.stage_mesh(config.mesh)
    module, params = common.build_model(config.model, tokenizer, common.rng_key(config.seed, 0))
    window = config.train.response_window
    pair_logps = make_pair_logps(module.apply, window)
    ref_chosen = ref_rejected = eval_ref = None
    if config.dpo.needs_reference:
        reference_path = config.reference or config.model.path
        if reference_path:
            _, ref_params = common.load_folder(reference_path, head="lm", key="reference")
        else:  # a fresh model is its own reference
            ref_params = params
        batch_size = config.eval.batch_size
        ref_chosen, ref_rejected = dataset_logps(pair_logps, ref_params, data, batch_size, mesh)
        if eval_data is not None:
            eval_ref = dataset_logps(pair_logps, ref_params, eval_data, batch_size, mesh, config.eval.max_batches)
        del ref_params
    optim = with_schedule_length(config.optim, config.train.steps)
    state, shardings = common.make_state(module, params, optim, mesh)
    del params
    step = compile_train_step(dpo_step, mesh=mesh, state_shardings=shardings, config=config.dpo,
                              response_window=window, num_microbatches=config.train.num_microbatches)
    batches = BatchIterator(data, config.train.batch_size, seed=config.seed, shuffle=config.data.shuffle,
                            drop_last=config.data.drop_last, bucket_multiple=config.data.bucket_multiple,
                            process_index=jax.process_index(), process_count=jax.process_count())

    def prepare(batch):
        if ref_chosen is None:
            return common.place(PreferenceBatch.from_arrays(batch), mesh)
        return common.place(with_reference(batch, ref_chosen, ref_rejected), mesh)

    evaluate = None
    if eval_data is not None:
        beta = config.dpo.beta

        def evaluate(carry):
            chosen, rejected = dataset_logps(pair_logps, carry["state"].params, eval_data,
                                             config.eval.batch_size, mesh, config.eval.max_batches)
            if eval_ref is not None:
                chosen, rejected = chosen - eval_ref[0], rejected - eval_ref[1]
            return {"eval/dpo/accuracy": float(np.mean(beta * chosen > beta * rejected)),
                    "eval/dpo/margin": float(np.mean(beta * (chosen - rejected)))}

    def step_fn(carry, batch):
        state, metrics = step(carry["state"], batch)
        return {"state": state, "rng": carry["rng"]}, metrics

    kind = config.dpo.kind
    result = run_loop(
        output_dir=output_dir, carry={"state": state, "rng": common.stage_rng(config.seed, mesh)},
        step_fn=step_fn, batches=batches,
        prepare_batch=prepare, num_steps=config.train.steps, checkpoint=config.checkpoint,
        logging=config.logging, resume=resume, stop_after=config.train.stop_after, evaluate=evaluate,
        eval_every=config.eval.every, description=kind,
        progress_keys=(f"{kind}/loss", f"{kind}/accuracy", "eval/dpo/accuracy"),
        compiled=() if config.data.bucket_multiple else (step,),
    )
    extra = {"data": vars(data.stats)}
    if result.finished:
        extra["model_dir"] = str(common.export_model(output_dir, module, result.carry["state"].params, tokenizer))
    return common.summary("dpo", output_dir, result, extra)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax dpo` entry point."""
    return train_dpo(load_stage_config(DPOConfig, config_path, overrides), resume=resume)
