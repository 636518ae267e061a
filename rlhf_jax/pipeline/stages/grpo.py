"""`rlhf-jax grpo`: GRPO / RLOO (group baselines, no value model) against reward functions, a
reward model, both, or the gold scorer.

    rlhf-jax grpo --config configs/grpo.yaml policy.path=runs/sft/model

One iteration samples `grpo.group_size` responses for each of `train.batch_size` prompts,
scores them, turns the scores into group-relative advantages and runs
`grpo.epochs x grpo.num_minibatches` clipped-ratio updates with a `grpo.kl_coef`-weighted
k3 KL to the frozen reference.

Where scoring runs: with a reward model alone (and neither `dynamic_sampling` nor
`mask_truncated`), the whole iteration is one compiled `grpo_iteration`. With reward
functions (`reward.functions`) or the gold scorer, the iteration is two compiled phases with
the scoring on the host between them:
`grpo_generate` (jit) -> decode + reward functions (host) -> `grpo_train` (jit). Between the
phases the host can also drop groups whose rewards all tie and refill the batch from further
prompts (`dynamic_sampling`, DAPO) and take responses without EOS out of the loss
(`mask_truncated`). The logged `objective/scores`, `rollout/response_length` and
`rollout/eos_rate` then still describe the responses as sampled (the first draw, all its
tokens), so runs with and without these options compare; `dynamic_sampling/selected_scores`
is the mean score of the groups the update trained on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.pipeline import dynamic_sampling
from rlhf_jax.typed_config import ConfigError
from rlhf_jax.pipeline.stage_configs import GRPOStageConfig, load_stage_config, schedule_length, with_schedule_length
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.pipeline.stages.lora import stage_state
from rlhf_jax.pipeline.stages.scoring import HostScorer
from rlhf_jax.training.grpo import (GRPO_STATIC_ARGNAMES, GRPO_TRAIN_STATIC_ARGNAMES, effective_scores,
                                    grpo_generate, grpo_iteration, grpo_train)
from rlhf_jax.training import multihost
from rlhf_jax.training.rollout import rollout_metrics
from rlhf_jax.training.sharding import replicated


def model_scorer(reward, tokenizer, key: str = "reward", attention_impl: str = "auto") -> dict:
    """`reward_module` / `reward_params` arguments of the in-jit reward model (none without
    one; it must read `tokenizer`'s ids), its attention run as `attention_impl` (the policy's)."""
    if not reward.uses_model:
        return {}
    if reward.path is None:
        raise ConfigError(f"`{key}.kind: reward_model` needs `{key}.path`, a reward-model folder "
                          f"(or leave `{key}.kind` at auto to score with the task's gold scorer)")
    module, params = stage_setup.load_reward_model(reward.path, tokenizer, f"{key}.path", attention_impl)
    return {"reward_module": module, "reward_params": params}


def _placed_like(tree, reference):
    """Arrays `tree` placed as the device arrays `reference` are (so the compiled update phase
    sees the same input placement every iteration)."""
    return jax.device_put(tree, jax.tree.map(lambda x: x.sharding, reference))


def without_truncated(data):
    """`data` whose responses without EOS count no token in the loss (`response_mask` 0),
    computed where the rollout lives (its placement kept)."""
    mask = data.response_mask * data.has_eos[..., None].astype(data.response_mask.dtype)
    return data.replace(response_mask=jax.device_put(mask, data.response_mask.sharding))


def _gather_groups(draws, selection, group_size: int):
    """The selected groups of several draws (rollouts `[n, G, R]` on the devices, one group
    per leading index; host scores flat `[n * G]`), as one rollout placed like the first
    draw (gathered on the devices, so over any number of processes) and its scores."""
    groups = len(draws[0][1]) // group_size
    order = np.asarray([draw * groups + group for draw, group in selection.groups])
    data = jax.tree.map(lambda *parts: jnp.concatenate(parts)[order], *[data for data, _ in draws])
    scores = np.concatenate([np.asarray(draws[draw][1]).reshape(-1, group_size)[group]
                             for draw, group in selection.groups])
    return _placed_like(data, draws[0][0]), scores


def train_grpo(config: GRPOStageConfig, *, resume: bool = False) -> dict:
    # Update minibatches hold whole prompt groups (each group's prompt runs once per minibatch).
    setup = skeletons.open_rollout_stage(config, "grpo", rows=config.train.batch_size,
                                         rows_key="train.batch_size", resume=resume)
    algorithm, mesh = setup.algorithm, setup.mesh
    policy_module, policy_params = stage_setup.build_model(config.policy, setup.tokenizer,
                                                      stage_setup.rng_key(config.seed, 0), key="policy")
    skeletons.check_rollout_positions(config, "grpo", policy_module)
    ref_params = skeletons.kl_reference(config, "grpo", algorithm.kl_coef, policy_module, policy_params,
                                        setup.tokenizer, mesh)
    in_jit = model_scorer(config.reward, setup.tokenizer, attention_impl=config.policy.attention_impl)
    host = None if not (config.reward.functions or config.reward.uses_gold) else \
        HostScorer.from_config(config.reward, setup.tokenizer, setup.batches.data, algorithm.sampling.eos_token_id,
                               stage="grpo", max_steps=schedule_length(config))
    skeletons.print_rollout_start("grpo", setup, host.describe() if host else ["reward model"])
    updates = schedule_length(config)  # iterations x epochs x num_minibatches
    policy_state, policy_shardings = stage_state(policy_module, policy_params,
                                                 with_schedule_length(config.optim, updates), mesh, config.lora, config.seed)
    del policy_params
    everywhere = replicated(mesh)
    if host is None and not (config.dynamic_sampling.enabled or config.mask_truncated):
        # Outputs keep the inputs' placement, so the next call hits the compiled program.
        iteration = jax.jit(grpo_iteration, static_argnames=GRPO_STATIC_ARGNAMES,
                            donate_argnames=("policy_state",), out_shardings=(policy_shardings, everywhere))

        def iterate(carry, batch, key):
            policy, metrics = iteration(carry["policy"], ref_params, batch["prompt_ids"], batch["prompt_mask"],
                                        key, config=algorithm, **in_jit)
            return {"policy": policy}, metrics

        compiled = (iteration,)
    else:
        generate = jax.jit(grpo_generate, static_argnames=GRPO_STATIC_ARGNAMES)
        train = jax.jit(grpo_train, static_argnames=GRPO_TRAIN_STATIC_ARGNAMES,
                        donate_argnames=("policy_state",), out_shardings=(policy_shardings, everywhere))
        group_size, prompts = algorithm.group_size, config.train.batch_size
        dynamic = config.dynamic_sampling
        # length and EOS rate of the responses as sampled (before selection and masking)
        as_sampled = jax.jit(lambda data: rollout_metrics(data.replace(scores=None, ref_logp=None, rewards=None)),
                             out_shardings=everywhere)

        def draw(policy, batch, key):
            data = generate(policy, ref_params, batch["prompt_ids"], batch["prompt_mask"], key,
                            config=algorithm, **in_jit)
            if host is None:  # the reward model alone, scored inside the generate phase
                return data, multihost.fetch(data.scores).reshape(-1), {}
            scores, metrics = host.score_rollout(data, batch["row_index"], repeat=group_size, step=policy.step)
            return data, scores, metrics

        def effective(data, scores):
            has_eos = np.asarray(multihost.fetch(data.has_eos)).reshape(-1)
            return effective_scores(np.asarray(scores), has_eos, config=algorithm)

        def iterate(carry, batch, key):
            sample_key, shuffle_key = jax.random.split(key)
            data, scores, metrics = draw(carry["policy"], batch, sample_key)
            sampled = {}
            if dynamic.enabled or config.mask_truncated:
                sampled = {**as_sampled(data), "objective/scores": float(np.mean(scores))}
            if dynamic.enabled:
                # groups tie on the scores the advantages use (`missing_eos_score` applied)
                draws, ties = [(data, scores)], [effective(data, scores)]
                while (len(draws) <= dynamic.max_refills
                       and dynamic_sampling.needs_refill(ties, prompts, group_size)):
                    more = skeletons.place_prompt_batch(next(setup.batches), mesh)
                    extra, extra_scores, _ = draw(carry["policy"], more, jax.random.fold_in(sample_key, len(draws)))
                    draws.append((extra, extra_scores))
                    ties.append(effective(extra, extra_scores))
                selection = dynamic_sampling.select_groups(ties, prompts, group_size)
                data, scores = _gather_groups(draws, selection, group_size)
                metrics.update({"dynamic_sampling/refills": float(selection.refills),
                                "dynamic_sampling/dropped_fraction": selection.dropped_fraction,
                                "dynamic_sampling/filled_fraction": selection.filled_fraction,
                                "dynamic_sampling/selected_scores": float(np.mean(scores))})
            if config.mask_truncated:
                data = without_truncated(data)
            policy, train_metrics = train(carry["policy"], data, scores, shuffle_key, config=algorithm)
            return {"policy": policy}, {**train_metrics, **sampled, **metrics}

        compiled = (generate, train)
    return skeletons.run_rollout_stage("grpo", config, setup, policy_module, {"policy": policy_state}, iterate,
                                    compiled=compiled, resume=resume,
                                    progress_keys=("objective/scores", "grpo/kl", "grpo/clipfrac",
                                                   *skeletons.reward_keys(host)))


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax grpo` entry point."""
    return train_grpo(load_stage_config(GRPOStageConfig, config_path, overrides), resume=resume)
