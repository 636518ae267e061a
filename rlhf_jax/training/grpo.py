"""GRPO and RLOO for language models: G samples per prompt, group baselines, no critic.

Shao et al. 2024 (GRPO, arXiv:2402.03300); Ahmadian et al. 2024 (RLOO, arXiv:2402.14740);
variants through `grpo_loss` options: DAPO (arXiv:2503.14476: `aggregation="dapo"`,
`clip_eps_high=0.28`, `kl_coef=0`), Dr. GRPO (arXiv:2503.20783: `aggregation="dr_grpo"`,
`scale="none"`), GSPO (arXiv:2507.18071: `importance_level="sequence"`).

One iteration on a batch of `n` left-padded prompts:

    sample G responses per prompt (one prefill per prompt, the G continuations share its
    KV cache) -> score (reward model, score_fn, or host reward functions between phases)
    -> sequence advantages [n, G]:  group  A = (R - mean_g R) / (std_g R + 1e-4)
                                    rloo   A = R - mean_{j != i} R_j
    -> epochs x num_minibatches steps of grpo_loss (clipped ratio against the
       rollout log-probs, + kl_coef * k3 KL to the reference per token), in one lax.scan

Layout: the rollout is `[n, G, R]` (`rlhf_jax.training.rollout`); every forward pass (rollout
log-probs and each update minibatch) runs each group's prompt once for its G responses
(`response_logprobs`). Minibatches are therefore formed over whole prompt groups:
`num_minibatches` must divide the number of prompts `n` (a group split across minibatches
would run its prompt twice; it is rejected with an error).

    step = jax.jit(grpo_iteration, static_argnames=GRPO_STATIC_ARGNAMES,
                   donate_argnames=("policy_state",))
    policy_state, metrics = step(policy_state, ref_params, prompt_ids, prompt_mask, key,
                                 config=config, score_fn=score_fn)

`grpo_iteration` is `grpo_generate` (jittable: sample, log-probs) followed by `grpo_train`
(jittable: scores -> advantages -> updates). With a reward model or a traceable `score_fn`
both run in one jit; with Python reward functions on decoded text (`rlhf_jax.rewards`,
`rlhf-jax grpo`) the scores are computed on the host between the two compiled phases.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.losses.aggregation import check_aggregation
from rlhf_jax.losses.policy import IMPORTANCE_LEVELS, grpo_loss
from rlhf_jax.ops.advantages import GROUP_SCALES, group_advantages, rloo_advantages
from rlhf_jax.ops.checks import check_finite_score, check_in, check_positive
from rlhf_jax.ops.masking import masked_mean
from rlhf_jax.training.rollout import (
    Rollout,
    SamplingConfig,
    flatten_responses,
    generate_rollout,
    policy_logprobs,
    rollout_logprobs,
    rollout_metrics,
    rollout_scores,
    with_scores,
)

GRPO_STATIC_ARGNAMES = ("config", "reward_module", "score_fn")  # grpo_iteration, grpo_generate
GRPO_TRAIN_STATIC_ARGNAMES = ("config",)  # grpo_train
ADVANTAGE_ESTIMATORS = ("group", "rloo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO / RLOO hyperparameters (frozen: a static jit argument)."""

    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    group_size: int = 4  # G responses per prompt
    advantage_estimator: Literal["group", "rloo"] = "group"  # GRPO baseline or leave-one-out
    scale: Literal["group", "batch", "none"] = "group"  # std used by the "group" estimator (rloo: unset)
    kl_coef: float = 0.04  # k3 KL coefficient (0: no reference forward pass)
    # k3 times the importance ratio pi / pi_old (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    kl_importance_weighted: bool = False
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # 0.28 for DAPO's clip-higher
    aggregation: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | token_mean | ...
    importance_level: Literal["token", "sequence"] = "token"  # "sequence" = GSPO
    epochs: int = 1  # passes over each rollout (mu in the GRPO paper)
    num_minibatches: int = 1  # optimizer steps per pass; must divide the number of prompts
    missing_eos_score: float | None = None  # score for responses without EOS
    # Each update minibatch runs a group's prompt once for its G responses; False runs every
    # response with its own copy of the prompt (the reference computation, G x the prompt cost).
    prompt_once: bool = True

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"`group_size` must be an int >= 2, got {self.group_size!r}")
        check_in(self.advantage_estimator, ADVANTAGE_ESTIMATORS, "advantage_estimator")
        check_in(self.scale, GROUP_SCALES, "scale")
        check_in(self.importance_level, IMPORTANCE_LEVELS, "importance_level")
        check_aggregation(self.aggregation)
        for name in ("clip_eps_low", "clip_eps_high", "epochs", "num_minibatches"):
            check_positive(getattr(self, name), name)
        if self.kl_coef < 0:
            raise ValueError(f"`kl_coef` must be >= 0, got {self.kl_coef}")
        if not isinstance(self.kl_importance_weighted, bool):
            raise ValueError(f"`kl_importance_weighted` must be true or false, got {self.kl_importance_weighted!r}")
        check_finite_score(self.missing_eos_score, "missing_eos_score")
        if self.advantage_estimator == "rloo" and self.scale != "group":
            raise ValueError(f"`scale` ({self.scale!r}) applies to advantage_estimator 'group' only; RLOO's "
                             f"leave-one-out advantages are not scaled (leave `scale` unset)")


def effective_scores(scores, has_eos, *, config: GRPOConfig):
    """The scores the advantages use: `missing_eos_score` (when set) for responses without
    EOS, the score otherwise; NumPy in, NumPy out (the host's dynamic sampling), else jnp."""
    if config.missing_eos_score is None:
        return scores
    xp = np if isinstance(scores, np.ndarray) and isinstance(has_eos, np.ndarray) else jnp
    return xp.where(xp.asarray(has_eos), scores, xp.float32(config.missing_eos_score))


def sequence_advantages(scores, has_eos, *, config: GRPOConfig):
    """Advantages of groups of `config.group_size` responses, shaped like `scores`.

    `scores`, `has_eos`: `[n, G]` (one row per prompt group), or flat `[n * G]` with
    contiguous groups. Responses without EOS first get `missing_eos_score` when it is set;
    then `group_advantages` (`advantage_estimator="group"`, with `scale`) or
    `rloo_advantages` (`"rloo"`).
    """
    shape = jnp.shape(scores)
    if len(shape) == 2 and shape[1] != config.group_size:
        raise ValueError(f"`scores` of shape {shape} must hold `group_size` = {config.group_size} "
                         "responses per row")
    scores = effective_scores(jnp.reshape(scores, (-1,)), jnp.reshape(has_eos, (-1,)), config=config)
    if config.advantage_estimator == "rloo":
        return rloo_advantages(scores, config.group_size).reshape(shape)
    return group_advantages(scores, config.group_size, scale=config.scale).reshape(shape)


def grpo_generate(policy_state, ref_params, prompt_ids, prompt_mask, rng, *, config: GRPOConfig,
                  reward_module=None, reward_params=None, score_fn=None) -> Rollout:
    """Generate phase (jittable): sample G responses per prompt and compute what needs no score.

    Returns a `Rollout` `[n, G, R]` (response g of prompt i at `[i, g]`). Fills `logp` and, when
    `config.kl_coef > 0`, `ref_logp` (then `ref_params` is required). `scores` come from the
    in-jit scorer when one is given (`reward_module` + `reward_params`, or `score_fn`, see
    `rlhf_jax.training.rollout.score_rollout`), else stay None for the host to compute and
    pass to `grpo_train`.

        generate = jax.jit(grpo_generate, static_argnames=GRPO_STATIC_ARGNAMES)
        train = jax.jit(grpo_train, static_argnames=("config",), donate_argnames=("policy_state",))
        sample_key, shuffle_key = jax.random.split(key)
        data = generate(policy_state, ref_params, prompt_ids, prompt_mask, sample_key, config=config)
        scores = my_host_scores(data)                        # NumPy [n, G] float32
        policy_state, metrics = train(policy_state, data, scores, shuffle_key, config=config)
    """
    if config.kl_coef > 0 and ref_params is None:
        raise ValueError("`ref_params` is required when `kl_coef` > 0")
    data = generate_rollout(policy_state, prompt_ids, prompt_mask, rng, sampling=config.sampling,
                            num_responses=config.group_size)
    data = rollout_logprobs(data, policy_state, ref_params if config.kl_coef > 0 else None,
                            sampling=config.sampling)
    if reward_module is not None or score_fn is not None:
        data = with_scores(data, rollout_scores(data, reward_module=reward_module,
                                                reward_params=reward_params, score_fn=score_fn))
    return data


def grpo_rollout(policy_state, ref_params, prompt_ids, prompt_mask, rng, *, config: GRPOConfig,
                 reward_module=None, reward_params=None, score_fn=None) -> Rollout:
    """Sample G responses per prompt, score them in jit, fill `advantages` `[n, G]`.

    `grpo_generate` with a scorer, then `sequence_advantages`.
    """
    if reward_module is None and score_fn is None:
        raise ValueError("give exactly one of `reward_module` (with `reward_params`) and `score_fn`")
    data = grpo_generate(policy_state, ref_params, prompt_ids, prompt_mask, rng, config=config,
                         reward_module=reward_module, reward_params=reward_params, score_fn=score_fn)
    return data.replace(advantages=sequence_advantages(data.scores, data.has_eos, config=config))


def _grpo_loss(params, apply_fn, batch: Rollout, config: GRPOConfig):
    flat = flatten_responses
    current = policy_logprobs(apply_fn, params, batch.batch, temperature=config.sampling.temperature,
                              kept_threshold=batch.kept_threshold, with_entropy=True,
                              prompt_once=config.prompt_once)
    mask = flat(batch.response_mask)
    loss, metrics = grpo_loss(
        flat(current.logprobs), flat(batch.logp), None if batch.ref_logp is None else flat(batch.ref_logp),
        flat(batch.advantages), mask, kl_logp=flat(current.full_logprobs),
        kl_importance_weighted=config.kl_importance_weighted,
        clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high, kl_coef=config.kl_coef,
        aggregation=config.aggregation, importance_level=config.importance_level,
        max_len=config.sampling.max_new_tokens,
    )
    metrics["grpo/entropy"] = masked_mean(jax.lax.stop_gradient(current.entropy), current.mask)
    return loss, metrics


def check_group_minibatches(num_prompts: int, num_minibatches: int) -> None:
    """Raise unless `num_minibatches` splits the `num_prompts` prompt groups evenly (module
    docstring: minibatches are formed over whole groups)."""
    if num_prompts % num_minibatches:
        raise ValueError(
            f"the rollout's {num_prompts} prompt groups do not split into `num_minibatches` = "
            f"{num_minibatches} equal minibatches; minibatches are formed over whole groups (each "
            "group's prompt runs once per minibatch), so `num_minibatches` must divide the "
            "number of prompts")


def grpo_update(policy_state, data: Rollout, rng, *, config: GRPOConfig):
    """`epochs x num_minibatches` steps of `grpo_loss` on one rollout, one `lax.scan`.

    `old_logp` is the rollout's `logp`, so the first step of each rollout has ratio 1 (with
    `logprobs_source="forward"`, whatever the sampling filters). Each pass shuffles the prompt
    groups afresh and cuts them into `num_minibatches` minibatches of whole groups.

    Returns `(policy_state, metrics)`: means over steps (those whose minibatch has counted
    tokens; with `mask_truncated` one may have none) of `grpo/loss`, `grpo/clipfrac`,
    `grpo/kl`, `grpo/ratio_mean`, `grpo/entropy`, `optim/grad_norm`, plus `rollout_metrics`,
    `grpo/reward_std` (mean within-group std of the scores the advantages use:
    `effective_scores`) and `grpo/zero_std_fraction` (share of groups whose scores all tie:
    zero advantages, no gradient from their policy term).
    """
    if data.advantages is None:
        raise ValueError("`grpo_update` needs a rollout with `advantages` (use `grpo_rollout`)")
    num_prompts = data.prompt_ids.shape[0]
    check_group_minibatches(num_prompts, config.num_minibatches)
    passes = config.epochs
    shuffles = jax.vmap(lambda key: jax.random.permutation(key, num_prompts))(jax.random.split(rng, passes))
    minibatch_groups = shuffles.reshape(passes * config.num_minibatches, num_prompts // config.num_minibatches)
    grad_fn = jax.value_and_grad(_grpo_loss, has_aux=True)

    def minibatch_step(state, groups):
        batch = jax.tree.map(lambda x: x[groups], data)
        (_, metrics), grads = grad_fn(state.params, state.apply_fn, batch, config)
        metrics["optim/grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads=grads), (metrics, jnp.any(batch.response_mask != 0))

    policy_state, (metrics, counted) = jax.lax.scan(minibatch_step, policy_state, minibatch_groups)
    # a minibatch with no counted tokens (mask_truncated, no response ended) reports 0 for every
    # token statistic: the means are over the steps that had tokens (0 when none had)
    steps = counted.astype(jnp.float32)
    metrics = {name: jnp.sum(value * steps) / jnp.maximum(jnp.sum(steps), 1.0) for name, value in metrics.items()}
    metrics.update(rollout_metrics(data))
    group_std = jnp.std(effective_scores(data.scores, data.has_eos, config=config), axis=1, ddof=1)
    metrics["grpo/reward_std"] = jnp.mean(group_std)
    metrics["grpo/zero_std_fraction"] = jnp.mean((group_std == 0).astype(jnp.float32))
    return policy_state, metrics


def grpo_train(policy_state, data: Rollout, scores, rng, *, config: GRPOConfig):
    """Update phase (jittable): `scores` `[n, G]` (or flat `[n * G]`) float32 -> group
    advantages -> `grpo_update`.

    `data` is a `grpo_generate` rollout (or rows of several, regrouped on the host, e.g. by
    dynamic sampling); `scores` may come from the host (reward functions on decoded text) or
    from an in-jit scorer. Returns `(policy_state, metrics)` (see `grpo_update`).
    """
    data = with_scores(data, scores)
    data = data.replace(advantages=sequence_advantages(data.scores, data.has_eos, config=config))
    return grpo_update(policy_state, data, rng, config=config)


def grpo_iteration(policy_state, ref_params, prompt_ids, prompt_mask, rng, *, config: GRPOConfig,
                   reward_module=None, reward_params=None, score_fn=None):
    """One GRPO / RLOO iteration with an in-jit scorer: `grpo_generate` -> `grpo_train`.

    Args:
      policy_state: `TrainState` of the `CausalLM` policy (donate it).
      ref_params: frozen reference parameters (may be None when `config.kl_coef == 0`).
      prompt_ids, prompt_mask: `[n, P]` left-padded prompts (each sampled G times).
      rng: PRNG key (split into the sampling key and the shuffle key).
      config: `GRPOConfig` (static).
      reward_module + reward_params, or score_fn: the scorer (see `score_rollout`). For
        Python scorers on text, call the two phases with host scoring in between instead.

    Returns:
      `(policy_state, metrics)` (see `grpo_update`).
    """
    if reward_module is None and score_fn is None:
        raise ValueError("give exactly one of `reward_module` (with `reward_params`) and `score_fn`")
    sample_key, shuffle_key = jax.random.split(rng)
    data = grpo_generate(policy_state, ref_params, prompt_ids, prompt_mask, sample_key, config=config,
                         reward_module=reward_module, reward_params=reward_params, score_fn=score_fn)
    return grpo_train(policy_state, data, data.scores, shuffle_key, config=config)


__all__ = [
    "GRPO_STATIC_ARGNAMES", "GRPO_TRAIN_STATIC_ARGNAMES", "ADVANTAGE_ESTIMATORS", "GRPOConfig",
    "effective_scores", "sequence_advantages", "check_group_minibatches", "grpo_generate", "grpo_rollout", "grpo_update", "grpo_train",
    "grpo_iteration",
]
