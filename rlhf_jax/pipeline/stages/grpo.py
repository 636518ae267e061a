"""`rlhf-jax grpo`: GRPO / RLOO (group baselines, no value model) against the gold scorer or a
reward model.

    rlhf-jax grpo --config configs/grpo.yaml policy.path=runs/sft/model

One iteration (`rlhf_jax.training.grpo.grpo_iteration`, compiled once) samples
`grpo.group_size` responses for each of `train.batch_size` prompts, scores them, turns the
scores into group-relative advantages and runs `grpo.num_iterations x grpo.num_minibatches`
clipped-ratio updates with a `grpo.beta`-weighted k3 KL to the frozen reference.
"""
from __future__ import annotations

import jax

from rlhf_jax.pipeline.recipes import GRPOStageConfig, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common, runs
from rlhf_jax.pipeline.stages.lora import stage_state
from rlhf_jax.pipeline.stages.ppo import scorer_arguments
from rlhf_jax.training.grpo import GRPO_STATIC_ARGNAMES, grpo_iteration
from rlhf_jax.training.sharding import replicated


def train_grpo(config: GRPOStageConfig, *, resume: bool = False) -> dict:
    # Update minibatches hold whole prompt groups (each group's prompt runs once per minibatch).
    setup = runs.open_rollout_stage(config, "grpo", rows=config.train.batch_size, rows_key="train.batch_size")
    algorithm, mesh = setup.algorithm, setup.mesh
    policy_module, policy_params = common.build_model(config.policy, setup.tokenizer,
                                                      common.rng_key(config.seed, 0), key="policy")
    ref_params = runs.frozen_reference(config, policy_params, mesh) if algorithm.beta > 0 else None
    scorer = scorer_arguments(config.reward, setup.tokenizer)
    updates = config.train.iterations * algorithm.num_iterations * algorithm.num_minibatches
    policy_state, policy_shardings = stage_state(policy_module, policy_params,
                                                 with_schedule_length(config.optim, updates), mesh, config.lora, config.seed)
    del policy_params
    # Outputs keep the inputs' placement, so the next call hits the compiled program.
    iteration = jax.jit(grpo_iteration, static_argnames=GRPO_STATIC_ARGNAMES,
                        donate_argnames=("policy_state",), out_shardings=(policy_shardings, replicated(mesh)))

    def iterate(carry, prompt_ids, prompt_mask, key):
        policy, metrics = iteration(carry["policy"], ref_params, prompt_ids, prompt_mask, key,
                                    config=algorithm, **scorer)
        return {"policy": policy}, metrics

    return runs.run_rollout_stage("grpo", config, setup, policy_module, {"policy": policy_state}, iterate,
                                    compiled=(iteration,), resume=resume,
                                    progress_keys=("objective/scores", "grpo/kl", "grpo/clipfrac"))


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax grpo` entry point."""
    return train_grpo(load_stage_config(GRPOStageConfig, config_path, overrides), resume=resume)
