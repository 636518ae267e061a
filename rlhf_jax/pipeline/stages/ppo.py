"""`rlhf-jax ppo`: KL-regularised PPO of a policy against a reward model, reward functions,
both, or the gold scorer.

    rlhf-jax ppo --config configs/ppo.yaml policy.path=runs/sft/model reward.path=runs/reward/model

Models: the policy (`policy.path`, trained), the frozen reference (`reference`, default the
policy folder; not loaded with `ppo.kl_coef: 0`), the value model (`value`, default the reward-model folder: its decoder with a
zeroed head, docs/numerics.md) and the scorer (`reward`: a reward-model folder, reward functions
with weights, both, or `kind: gold`, the built-in task's verifiable reward). With a reward
model alone the iteration is one compiled `ppo_iteration`; with reward functions or the gold
scorer it is `ppo_generate` (jit) -> scoring on the host -> `ppo_train` (jit). One iteration
samples `train.batch_size` prompts' responses, scores them, shapes rewards with
the KL penalty, runs GAE and `ppo.epochs x ppo.num_minibatches` updates of the policy and the
value model. The optimizer schedules span `iterations * epochs * num_minibatches` updates. With `lora`, the
policy and the value model each train adapters on their frozen weights (the value model also
its `score` head, in full), and the reference is the policy's base with its adapters disabled.
"""
from __future__ import annotations

import jax

from rlhf_jax.pipeline.frozen_base import BaseSource
from rlhf_jax.pipeline.stage_configs import PPOStageConfig, load_stage_config, schedule_length, with_schedule_length
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.pipeline.stages.grpo import model_scorer
from rlhf_jax.pipeline.stages.lora import stage_state
from rlhf_jax.pipeline.stages.skeletons import prompt_batches, sampling_with_tokenizer  # noqa: F401 (re-exported)
from rlhf_jax.pipeline.stages.scoring import HostScorer
from rlhf_jax.training.ppo import (PPO_STATIC_ARGNAMES, PPO_TRAIN_STATIC_ARGNAMES, kl_controller, ppo_generate,
                                   ppo_iteration, ppo_train)
from rlhf_jax.training.sharding import replicated


def train_ppo(config: PPOStageConfig, *, resume: bool = False) -> dict:
    setup = skeletons.open_rollout_stage(config, "ppo", rows=config.train.batch_size,
                                         rows_key="train.batch_size", resume=resume)
    algorithm, mesh = setup.algorithm, setup.mesh
    policy_module, policy_params = stage_setup.build_model(config.policy, setup.tokenizer,
                                                      stage_setup.rng_key(config.seed, 0), key="policy")
    skeletons.check_rollout_positions(config, "ppo", policy_module)
    ref_params = skeletons.kl_reference(config, "ppo", algorithm.kl_coef, policy_module, policy_params,
                                        setup.tokenizer, mesh)
    value_key, value_path = next(((key, path) for key, path in (
        ("value", config.value), ("reward.path", config.reward.path if config.reward.uses_model else None),
        ("policy.path", config.policy.path)) if path), ("value", None))
    value_module, value_params = stage_setup.load_folder(value_path, head="value", key="value",
                                                         attention_impl=config.policy.attention_impl)
    in_jit = model_scorer(config.reward, setup.tokenizer, attention_impl=config.policy.attention_impl)
    host = None if not (config.reward.functions or config.reward.uses_gold) else \
        HostScorer.from_config(config.reward, setup.tokenizer, setup.batches.data, algorithm.sampling.eos_token_id,
                               stage="ppo", max_steps=schedule_length(config))
    skeletons.print_rollout_start("ppo", setup, host.describe() if host else ["reward model"])
    if jax.process_index() == 0:
        source = f"the decoder of {value_path} (`{value_key}`)" if value_path else "a fresh decoder"
        print(f"[ppo] value model: {source} with a zeroed value head", flush=True)

    updates = schedule_length(config)  # iterations x epochs x num_minibatches
    policy_state, policy_shardings = stage_state(policy_module, policy_params,
                                                 with_schedule_length(config.optim, updates), mesh, config.lora, config.seed)
    value_state, value_shardings = stage_state(
        value_module, value_params, with_schedule_length(config.value_optim or config.optim, updates), mesh,
        config.lora, config.seed, stream=7)
    del policy_params, value_params
    everywhere = replicated(mesh)
    out_shardings = (policy_shardings, value_shardings, everywhere, everywhere)
    donated = ("policy_state", "value_state", "kl_state")
    if host is None:
        # Outputs keep the inputs' placement, so the next call hits the compiled program.
        iteration = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES, donate_argnames=donated,
                            out_shardings=out_shardings)

        def iterate(carry, batch, key):
            policy, value, kl_state, metrics = iteration(
                carry["policy"], carry["value"], carry["kl"], ref_params, batch["prompt_ids"],
                batch["prompt_mask"], key, config=algorithm, **in_jit)
            return {"policy": policy, "value": value, "kl": kl_state}, metrics

        compiled = (iteration,)
    else:
        generate = jax.jit(ppo_generate, static_argnames=PPO_STATIC_ARGNAMES)
        train = jax.jit(ppo_train, static_argnames=PPO_TRAIN_STATIC_ARGNAMES, donate_argnames=donated,
                        out_shardings=out_shardings)

        def iterate(carry, batch, key):
            sample_key, shuffle_key = jax.random.split(key)
            data = generate(carry["policy"], carry["value"], ref_params, batch["prompt_ids"], batch["prompt_mask"],
                            sample_key, config=algorithm, **in_jit)
            scores, metrics = host.score_rollout(data, batch["row_index"], step=carry["policy"].step)
            policy, value, kl_state, train_metrics = train(carry["policy"], carry["value"], carry["kl"], data,
                                                           scores, shuffle_key, config=algorithm)
            return {"policy": policy, "value": value, "kl": kl_state}, {**train_metrics, **metrics}

        compiled = (generate, train)

    carry = {"policy": policy_state, "value": value_state,
             "kl": jax.device_put(kl_controller(algorithm).init(), everywhere)}
    return skeletons.run_rollout_stage("ppo", config, setup, policy_module, carry, iterate, compiled=compiled,
                                    progress_keys=("objective/scores", "objective/kl", "ppo/clipfrac",
                                                   *skeletons.reward_keys(host)),
                                    resume=resume, base_sources={"value": BaseSource(value_key, str(value_path))})


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax ppo` entry point."""
    return train_ppo(load_stage_config(PPOStageConfig, config_path, overrides), resume=resume)
