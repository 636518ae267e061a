"""`rlhf-jax grpo`: GRPO / RLOO (group baselines, no value model) against the gold scorer or a
reward model.

    rlhf-jax grpo --config configs/grpo.yaml policy.path=runs/sft/model

One iteration (`rlhf_jax.training.grpo.grpo_iteration`, compiled once) samples
`grpo.group_size` responses for each of `train.batch_size` prompts, scores them, turns the
scores into group-relative advantages and runs `grpo.num_iterations x grpo.num_minibatches`
clipped-ratio updates with a `grpo.beta`-weighted k3 KL to the frozen reference.
"""
from __future__ import annotations

import dataclasses

import jax

from rlhf_jax.pipeline.config import ConfigError
from rlhf_jax.pipeline.loop import run_loop
from rlhf_jax.pipeline.recipes import GRPOStageConfig, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common
from rlhf_jax.pipeline.stages.ppo import prompt_batches, sampling_with_tokenizer, scorer_arguments
from rlhf_jax.training.grpo import GRPO_STATIC_ARGNAMES, grpo_iteration
from rlhf_jax.training.sharding import replicated


def train_grpo(config: GRPOStageConfig, *, resume: bool = False) -> dict:
    output_dir = common.prepare_output_dir(config)
    tokenizer = common.stage_tokenizer(config.tokenizer, config.policy.path)
    algorithm = dataclasses.replace(config.grpo, sampling=sampling_with_tokenizer(config.grpo.sampling, tokenizer))
    rows = config.train.batch_size * algorithm.group_size
    if rows % algorithm.num_minibatches:
        raise ConfigError(f"`train.batch_size * grpo.group_size` ({rows}) must be a multiple of "
                          f"`grpo.num_minibatches` ({algorithm.num_minibatches})")
    batches = prompt_batches(config, tokenizer, seed=config.seed)
    mesh = common.stage_mesh(config.mesh)
    policy_module, policy_params = common.build_model(config.policy, tokenizer, common.rng_key(config.seed, 0),
                                                      key="policy")
    everywhere = replicated(mesh)
    ref_params = None
    if algorithm.beta > 0:
        reference_path = config.reference or config.policy.path
        if reference_path:
            ref_params = common.load_folder(reference_path, head="lm", key="reference")[1]
        else:
            ref_params = jax.tree.map(lambda x: x.copy(), policy_params)
        ref_params = jax.device_put(ref_params, everywhere)
    scorer = scorer_arguments(config.reward, tokenizer)
    updates = config.train.iterations * algorithm.num_iterations * algorithm.num_minibatches
    policy_state, policy_shardings = common.make_state(policy_module, policy_params,
                                                       with_schedule_length(config.optim, updates), mesh)
    del policy_params
    # Outputs keep the inputs' placement, so the next call hits the compiled program.
    iteration = jax.jit(grpo_iteration, static_argnames=GRPO_STATIC_ARGNAMES,
                        donate_argnames=("policy_state",), out_shardings=(policy_shardings, everywhere))
    split = jax.jit(jax.random.split, out_shardings=everywhere)

    def step_fn(carry, batch):
        rng, key = split(carry["rng"])
        policy, metrics = iteration(carry["policy"], ref_params, batch["prompt_ids"], batch["prompt_mask"],
                                    key, config=algorithm, **scorer)
        return {"policy": policy, "rng": rng}, metrics

    carry = {"policy": policy_state, "rng": common.stage_rng(config.seed, mesh)}
    result = run_loop(
        output_dir=output_dir, carry=carry, step_fn=step_fn, batches=batches,
        prepare_batch=lambda batch: common.place(
            {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}, mesh),
        num_steps=config.train.iterations, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after, description="grpo",
        progress_keys=("objective/scores", "grpo/kl", "grpo/clipfrac"), compiled=(iteration,),
    )
    extra = {}
    if result.finished:
        extra["model_dir"] = str(common.export_model(output_dir, policy_module,
                                                     result.carry["policy"].params, tokenizer))
    return common.summary("grpo", output_dir, result, extra)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax grpo` entry point."""
    return train_grpo(load_stage_config(GRPOStageConfig, config_path, overrides), resume=resume)
