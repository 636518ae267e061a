"""`rlhf-jax ppo`: KL-regularised PPO of a policy against a reward model (or the gold scorer).

    rlhf-jax ppo --config configs/ppo.yaml policy.path=runs/sft/model reward.path=runs/reward/model

Models: the policy (`policy.path`, trained), the frozen reference (`reference`, default the
policy folder), the value model (`value`, default the reward-model folder: its decoder with a
zeroed head, NUMERICS.md) and the scorer (`reward.kind`: a reward-model folder, or `gold`, the
built-in task's verifiable reward). One iteration (`rlhf_jax.training.ppo.ppo_iteration`,
compiled once) samples `train.batch_size` prompts' responses, scores them, shapes rewards with
the KL penalty, runs GAE and `ppo.epochs x ppo.num_minibatches` updates of the policy and the
value model. The optimizer schedules span `iterations * epochs * num_minibatches` updates.
"""
from __future__ import annotations

import dataclasses

import jax

from rlhf_jax.pipeline.config import ConfigError
from rlhf_jax.pipeline.data import BatchIterator, load_data
from rlhf_jax.pipeline.loop import run_loop
from rlhf_jax.pipeline.recipes import PPOStageConfig, RewardSource, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common
from rlhf_jax.pipeline.stages.scoring import gold_score_fn
from rlhf_jax.training.ppo import PPO_STATIC_ARGNAMES, kl_controller, ppo_iteration
from rlhf_jax.training.rollout import host_scorer
from rlhf_jax.training.sharding import replicated


def scorer_arguments(reward: RewardSource, tokenizer, *, key: str = "reward") -> dict:
    """`reward_module`/`reward_params` or `score_fn` keyword arguments for a rollout."""
    if reward.kind == "gold":
        return {"score_fn": host_scorer(gold_score_fn(tokenizer, kind=reward.gold_kind))}
    module, params = common.load_folder(reward.path, head="reward", key=f"{key}.path")
    return {"reward_module": module, "reward_params": params}


def sampling_with_tokenizer(sampling, tokenizer):
    """The sampling config with the tokenizer's EOS and pad ids."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad == tokenizer.eos_token_id:
        raise ConfigError("the tokenizer's pad token equals its EOS token; RL needs them distinct "
                          "(a rollout tells 'stopped' from 'padding' by the id)")
    return dataclasses.replace(sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)


def prompt_batches(config, tokenizer, *, seed: int) -> BatchIterator:
    common.require(config.data.train_files, "data.train_files", "RL needs prompt data")
    data = load_data(config.data.train_files, tokenizer, config.data, kind="prompt")
    return BatchIterator(data, config.train.batch_size, seed=seed, shuffle=config.data.shuffle,
                         drop_last=True, process_index=jax.process_index(),
                         process_count=jax.process_count())


def train_ppo(config: PPOStageConfig, *, resume: bool = False) -> dict:
    output_dir = common.prepare_output_dir(config)
    tokenizer = common.stage_tokenizer(config.tokenizer, config.policy.path)
    algorithm = dataclasses.replace(config.ppo, sampling=sampling_with_tokenizer(config.ppo.sampling, tokenizer))
    if config.train.batch_size % algorithm.num_minibatches:
        raise ConfigError(f"`train.batch_size` ({config.train.batch_size}) must be a multiple of "
                          f"`ppo.num_minibatches` ({algorithm.num_minibatches})")
    batches = prompt_batches(config, tokenizer, seed=config.seed)
    mesh = common.stage_mesh(config.mesh)
    policy_module, policy_params = common.build_model(config.policy, tokenizer, common.rng_key(config.seed, 0),
                                                      key="policy")
    reference_path = config.reference or config.policy.path
    if reference_path:
        _, ref_params = common.load_folder(reference_path, head="lm", key="reference")
    else:
        ref_params = jax.tree.map(lambda x: x.copy(), policy_params)
    value_path = config.value or (config.reward.path if config.reward.kind == "reward_model" else None)
    value_path = value_path or config.policy.path
    value_module, value_params = common.load_folder(value_path, head="value", key="value")
    scorer = scorer_arguments(config.reward, tokenizer)

    updates = config.train.iterations * algorithm.epochs * algorithm.num_minibatches
    policy_state, policy_shardings = common.make_state(policy_module, policy_params,
                                                       with_schedule_length(config.optim, updates), mesh)
    value_state, value_shardings = common.make_state(
        value_module, value_params, with_schedule_length(config.value_optim or config.optim, updates), mesh)
    del policy_params, value_params
    everywhere = replicated(mesh)
    ref_params = jax.device_put(ref_params, everywhere)
    # Outputs keep the inputs' placement, so the next call hits the compiled program.
    iteration = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                        donate_argnames=("policy_state", "value_state", "kl_state"),
                        out_shardings=(policy_shardings, value_shardings, everywhere, everywhere))

    split = jax.jit(jax.random.split, out_shardings=everywhere)

    def step_fn(carry, batch):
        rng, key = split(carry["rng"])
        policy, value, kl_state, metrics = iteration(
            carry["policy"], carry["value"], carry["kl"], ref_params, batch["prompt_ids"],
            batch["prompt_mask"], key, config=algorithm, **scorer)
        return {"policy": policy, "value": value, "kl": kl_state, "rng": rng}, metrics

    carry = {"policy": policy_state, "value": value_state,
             "kl": jax.device_put(kl_controller(algorithm).init(), everywhere),
             "rng": common.stage_rng(config.seed, mesh)}
    result = run_loop(
        output_dir=output_dir, carry=carry, step_fn=step_fn, batches=batches,
        prepare_batch=lambda batch: common.place(
            {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"]}, mesh),
        num_steps=config.train.iterations, checkpoint=config.checkpoint, logging=config.logging,
        resume=resume, stop_after=config.train.stop_after, description="ppo",
        progress_keys=("objective/scores", "objective/kl", "ppo/clipfrac"), compiled=(iteration,),
    )
    extra = {}
    if result.finished:
        extra["model_dir"] = str(common.export_model(output_dir, policy_module,
                                                     result.carry["policy"].params, tokenizer))
    return common.summary("ppo", output_dir, result, extra)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax ppo` entry point."""
    return train_ppo(load_stage_config(PPOStageConfig, config_path, overrides), resume=resume)
