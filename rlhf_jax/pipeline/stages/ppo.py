"""`rlhf-jax ppo`: KL-regularised PPO of a policy against a reward model (or the gold scorer).

    rlhf-jax ppo --config configs/ppo.yaml policy.path=runs/sft/model reward.path=runs/reward/model

Models: the policy (`policy.path`, trained), the frozen reference (`reference`, default the
policy folder), the value model (`value`, default the reward-model folder: its decoder with a
zeroed head, NUMERICS.md) and the scorer (`reward.kind`: a reward-model folder, or `gold`, the
built-in task's verifiable reward). One iteration (`rlhf_jax.training.ppo.ppo_iteration`,
compiled once) samples `train.batch_size` prompts' responses, scores them, shapes rewards with
the KL penalty, runs GAE and `ppo.epochs x ppo.num_minibatches` updates of the policy and the
value model. The optimizer schedules span `iterations * epochs * num_minibatches` updates. With `lora`, the
policy and the value model each train adapters on their frozen weights (the value model also
its `score` head, in full), and the reference is the policy's base with its adapters disabled.
"""
from __future__ import annotations

import jax

from rlhf_jax.pipeline.recipes import PPOStageConfig, RewardSource, load_stage_config, with_schedule_length
from rlhf_jax.pipeline.stages import common, runs
from rlhf_jax.pipeline.stages.lora import stage_state
from rlhf_jax.pipeline.stages.runs import prompt_batches, sampling_with_tokenizer  # noqa: F401 (re-exported)
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


def train_ppo(config: PPOStageConfig, *, resume: bool = False) -> dict:
    setup = runs.open_rollout_stage(config, "ppo", rows=config.train.batch_size, rows_key="train.batch_size")
    algorithm, mesh = setup.algorithm, setup.mesh
    policy_module, policy_params = common.build_model(config.policy, setup.tokenizer,
                                                      common.rng_key(config.seed, 0), key="policy")
    ref_params = runs.frozen_reference(config, policy_params, mesh)
    value_path = config.value or (config.reward.path if config.reward.kind == "reward_model" else None)
    value_path = value_path or config.policy.path
    value_module, value_params = common.load_folder(value_path, head="value", key="value")
    scorer = scorer_arguments(config.reward, setup.tokenizer)

    updates = config.train.iterations * algorithm.epochs * algorithm.num_minibatches
    policy_state, policy_shardings = stage_state(policy_module, policy_params,
                                                 with_schedule_length(config.optim, updates), mesh, config.lora, config.seed)
    value_state, value_shardings = stage_state(
        value_module, value_params, with_schedule_length(config.value_optim or config.optim, updates), mesh,
        config.lora, config.seed, stream=7)
    del policy_params, value_params
    everywhere = replicated(mesh)
    # Outputs keep the inputs' placement, so the next call hits the compiled program.
    iteration = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                        donate_argnames=("policy_state", "value_state", "kl_state"),
                        out_shardings=(policy_shardings, value_shardings, everywhere, everywhere))

    def iterate(carry, prompt_ids, prompt_mask, key):
        policy, value, kl_state, metrics = iteration(
            carry["policy"], carry["value"], carry["kl"], ref_params, prompt_ids, prompt_mask, key,
            config=algorithm, **scorer)
        return {"policy": policy, "value": value, "kl": kl_state}, metrics

    carry = {"policy": policy_state, "value": value_state,
             "kl": jax.device_put(kl_controller(algorithm).init(), everywhere)}
    return runs.run_rollout_stage("ppo", config, setup, policy_module, carry, iterate, compiled=(iteration,),
                                    progress_keys=("objective/scores", "objective/kl", "ppo/clipfrac"),
                                    resume=resume)


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax ppo` entry point."""
    return train_ppo(load_stage_config(PPOStageConfig, config_path, overrides), resume=resume)
