"""`rlhf-jax sft`: supervised fine-tuning on prompt/completion (or messages) data.

    rlhf-jax sft --config configs/sft.yaml model.path=my_model data.train_files=[sft.jsonl]

Trains the response tokens with cross-entropy (`rlhf_jax.training.sft_step`), evaluates the
held-out files' token loss and accuracy as `eval/sft/*`, and exports `<output_dir>/model`.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.pipeline.data import BatchIterator, DataPosition, load_data
from rlhf_jax.pipeline.loop import compile_train_step, run_loop
from rlhf_jax.pipeline.recipes import SFTConfig, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common
from rlhf_jax.training.batches import SFTBatch
from rlhf_jax.training.policy_logps import response_logits
from rlhf_jax.training.sft_step import sft_step


def make_sft_evaluator(apply_fn, data, config: SFTConfig, mesh):
    """`params -> {"eval/sft/loss", "eval/sft/accuracy"}`: token means over the held-out data."""
    batches = BatchIterator(data, config.eval.batch_size, shuffle=False, drop_last=False,
                            process_index=jax.process_index(), process_count=jax.process_count())

    @jax.jit
    def sums(params, batch: SFTBatch):
        scored = response_logits(apply_fn, params, batch.input_ids, batch.attention_mask,
                                 batch.loss_mask, response_window=config.train.response_window)
        _, metrics = sft_loss(scored.logits, scored.labels, scored.mask)
        tokens = scored.mask.sum()
        return metrics["sft/nll"] * tokens, metrics["sft/accuracy"] * tokens, tokens

    def evaluate(params) -> dict:
        batches.restore(DataPosition())
        totals = np.zeros(3)
        limit = config.eval.max_batches or batches.batches_per_epoch
        for _, batch in zip(range(limit), batches.epoch_batches()):
            totals += np.asarray(jax.device_get(sums(params, common.place(SFTBatch.from_arrays(batch), mesh))))
        tokens = max(totals[2], 1.0)
        return {"eval/sft/loss": totals[0] / tokens, "eval/sft/accuracy": totals[1] / tokens}

    return evaluate


def train_sft(config: SFTConfig, *, resume: bool = False) -> dict:
    output_dir = common.prepare_output_dir(config)
    tokenizer = common.stage_tokenizer(config.tokenizer, config.model.path)
    common.require(config.data.train_files, "data.train_files", "SFT needs prompt/completion data")
    data = load_data(config.data.train_files, tokenizer, config.data, kind="sft")
    eval_data = (load_data(config.data.eval_files, tokenizer, config.data, kind="sft")
                 if config.data.eval_files else None)
    mesh = common.stage_mesh(config.mesh)
    module, params = common.build_model(config.model, tokenizer, common.rng_key(config.seed, 0))
    optim = with_schedule_length(config.optim, config.train.steps)
    state, shardings = common.make_state(module, params, optim, mesh)
    del params
    step = compile_train_step(sft_step, mesh=mesh, state_shardings=shardings,
                              label_smoothing=config.sft.label_smoothing,
                              response_window=config.train.response_window,
                              num_microbatches=config.train.num_microbatches)
    batches = BatchIterator(data, config.train.batch_size, seed=config.seed, shuffle=config.data.shuffle,
                            drop_last=config.data.drop_last, bucket_multiple=config.data.bucket_multiple,
                            process_index=jax.process_index(), process_count=jax.process_count())
    evaluate = None
    if eval_data is not None:
        evaluate_params = make_sft_evaluator(module.apply, eval_data, config, mesh)
        evaluate = lambda carry: evaluate_params(carry["state"].params)

    def step_fn(carry, batch):
        state, metrics = step(carry["state"], batch)
        return {"state": state, "rng": carry["rng"]}, metrics

    result = run_loop(
        output_dir=output_dir, carry={"state": state, "rng": common.stage_rng(config.seed, mesh)},
        step_fn=step_fn, batches=batches,
        prepare_batch=lambda batch: common.place(SFTBatch.from_arrays(batch), mesh),
        num_steps=config.train.steps, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after, evaluate=evaluate,
        eval_every=config.eval.every, description="sft",
        progress_keys=("sft/loss", "sft/accuracy", "eval/sft/accuracy"),
        compiled=() if config.data.bucket_multiple else (step,),
    )
    extra = {"data": vars(data.stats)}
    if result.finished:
        extra["model_dir"] = str(common.export_model(output_dir, module, result.carry["state"].params, tokenizer))
    return common.summary("sft", output_dir, result, extra)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax sft` entry point."""
    return train_sft(load_stage_config(SFTConfig, config_path, overrides), resume=resume)
