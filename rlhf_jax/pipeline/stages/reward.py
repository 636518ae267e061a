"""`rlhf-jax reward`: a Bradley-Terry reward model on prompt/chosen/rejected pairs.

    rlhf-jax reward --config configs/reward.yaml model.path=runs/sft/model

The model is the decoder of `model.path` (usually the SFT policy) with a scalar head read at
the last token (`RewardModel`; a fresh N(0, 1/sqrt(d+1)) head unless the folder has one).
Held-out pairs (`data.eval_files`) give `eval/reward/accuracy` (share of pairs scored in the
right order) and `eval/reward/margin`. The model is exported as a `*ForSequenceClassification`
folder in `<output_dir>/model`.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.pipeline.data import BatchIterator, DataPosition, load_data
from rlhf_jax.pipeline.loop import compile_train_step, run_loop
from rlhf_jax.pipeline.recipes import RewardConfig, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.reward_step import pair_scores, reward_step


def pair_batch(batch: dict) -> PreferenceBatch:
    return PreferenceBatch.from_arrays(batch)


def make_pair_scorer(apply_fn):
    """Jitted `(params, PreferenceBatch) -> (chosen [B], rejected [B])` reward-model scores."""
    return jax.jit(lambda params, batch: pair_scores(apply_fn, params, batch))


def score_pairs(scorer, params, data, batch_size: int, mesh, max_batches: int | None = None):
    """Scores `(chosen [N], rejected [N])` of every pair of `data` (fixed-shape batches)."""
    batches = BatchIterator(data, batch_size, shuffle=False, drop_last=False,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batches.restore(DataPosition())
    chosen, rejected = [], []
    limit = max_batches or batches.batches_per_epoch
    for _, batch in zip(range(limit), batches.epoch_batches()):
        keep = batch["example_mask"] > 0
        scores = jax.device_get(scorer(params, common.place(pair_batch(batch), mesh)))
        chosen.append(np.asarray(scores[0])[keep])
        rejected.append(np.asarray(scores[1])[keep])
    return np.concatenate(chosen), np.concatenate(rejected)


def pair_accuracy(chosen, rejected) -> dict:
    return {"eval/reward/accuracy": float(np.mean(chosen > rejected)),
            "eval/reward/margin": float(np.mean(chosen - rejected))}


def train_reward(config: RewardConfig, *, resume: bool = False) -> dict:
    output_dir = common.prepare_output_dir(config)
    tokenizer = common.stage_tokenizer(config.tokenizer, config.model.path)
    common.require(config.data.train_files, "data.train_files", "the reward model needs preference pairs")
    data = load_data(config.data.train_files, tokenizer, config.data, kind="preference")
    eval_data = (load_data(config.data.eval_files, tokenizer, config.data, kind="preference")
                 if config.data.eval_files else None)
    mesh = common.stage_mesh(config.mesh)
    module, params = common.build_model(config.model, tokenizer, common.rng_key(config.seed, 0), head="reward")
    optim = with_schedule_length(config.optim, config.train.steps)
    state, shardings = common.make_state(module, params, optim, mesh)
    del params
    step = compile_train_step(reward_step, mesh=mesh, state_shardings=shardings,
                              center_coef=config.reward.center_coef,
                              num_microbatches=config.train.num_microbatches)
    batches = BatchIterator(data, config.train.batch_size, seed=config.seed, shuffle=config.data.shuffle,
                            drop_last=config.data.drop_last, bucket_multiple=config.data.bucket_multiple,
                            process_index=jax.process_index(), process_count=jax.process_count())
    evaluate = None
    if eval_data is not None:
        scorer = make_pair_scorer(module.apply)
        evaluate = lambda carry: pair_accuracy(*score_pairs(
            scorer, carry["state"].params, eval_data, config.eval.batch_size, mesh, config.eval.max_batches))

    def step_fn(carry, batch):
        state, metrics = step(carry["state"], batch)
        return {"state": state, "rng": carry["rng"]}, metrics

    result = run_loop(
        output_dir=output_dir, carry={"state": state, "rng": common.stage_rng(config.seed, mesh)},
        step_fn=step_fn, batches=batches,
        prepare_batch=lambda batch: common.place(pair_batch(batch), mesh),
        num_steps=config.train.steps, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after, evaluate=evaluate,
        eval_every=config.eval.every, description="reward",
        progress_keys=("reward/loss", "reward/accuracy", "eval/reward/accuracy"),
        compiled=() if config.data.bucket_multiple else (step,),
    )
    extra = {"data": vars(data.stats)}
    if result.finished:
        extra["model_dir"] = str(common.export_model(output_dir, module, result.carry["state"].params, tokenizer))
    return common.summary("reward", output_dir, result, extra)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax reward` entry point."""
    return train_reward(load_stage_config(RewardConfig, config_path, overrides), resume=resume)
