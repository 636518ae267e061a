"""PPO for language models: one iteration = rollout -> epochs x minibatches update -> KL coef.

The recipe of Ziegler et al. 2019 (arXiv:1909.08593) and Ouyang et al. 2022
(arXiv:2203.02155) with the details of docs/numerics.md: KL-shaped per-token rewards with the
score on the last response token, GAE (gamma 1, gae_lambda 0.95), whitened advantages, clipped
policy surrogate (eps 0.2), clipped value loss (eps 0.2, vf_coef 0.1), 4 epochs with a fresh
shuffle each, minibatches, and a fixed or adaptive KL coefficient. The policy and the value
model are separate networks with their own train states; the value model starts from the
reward model's decoder with a zeroed head (`value_params_from_reward_model`).

    config = PPOConfig(sampling=SamplingConfig(max_new_tokens=32, eos_token_id=1, pad_token_id=0))
    controller = kl_controller(config)
    kl_state = controller.init()
    step = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                   donate_argnames=("policy_state", "value_state"))
    for prompt_ids, prompt_mask in prompts:          # fixed [B, P] shapes: compiles once
        rng, key = jax.random.split(rng)
        policy_state, value_state, kl_state, metrics = step(
            policy_state, value_state, kl_state, ref_params, prompt_ids, prompt_mask, key,
            config=config, reward_module=reward_model, reward_params=reward_params)

Layout: a PPO rollout is the `LMBatch` layout with N = 1 (`prompt_ids [B, P]`, per-token
arrays `[B, 1, R]`, `scores [B, 1]`, `rlhf_jax.training.rollout`); the losses read them
flattened to `[B, R]`. Log-probs and values come from `policy_logprobs` / `response_values`
(`response_logprobs` / `response_hidden_states`), the same path as the rollout's.

`ppo_update` alone runs every epoch and minibatch inside one `lax.scan`, so one compiled call
does the whole optimisation phase of an iteration.

`ppo_iteration` is `ppo_generate` (jittable: sample, log-probs, values) followed by
`ppo_train` (jittable: scores -> shaped rewards, GAE -> updates -> KL coefficient). With a
reward model or a traceable `score_fn` both run in one jit; with Python reward functions on
decoded text (`rlhf_jax.rewards`, `rlhf-jax ppo`) the scores are computed on the host between
the two compiled phases.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.losses.aggregation import aggregate, check_aggregation
from rlhf_jax.losses.policy import ppo_policy_loss
from rlhf_jax.losses.value import value_loss
from rlhf_jax.ops.checks import check_finite_score, check_in, check_positive
from rlhf_jax.ops.kl import KL_ESTIMATORS
from rlhf_jax.ops.kl_controller import KLController, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.ops.masking import masked_mean
from rlhf_jax.training.rollout import (
    Rollout,
    SamplingConfig,
    flatten_responses,
    generate_rollout,
    policy_logprobs,
    ppo_advantages,
    response_values,
    rollout_logprobs,
    rollout_metrics,
    rollout_scores,
    with_scores,
)

PPO_STATIC_ARGNAMES = ("config", "reward_module", "score_fn")  # ppo_iteration, ppo_generate
PPO_TRAIN_STATIC_ARGNAMES = ("config",)  # ppo_train


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (frozen: a static jit argument). Defaults follow docs/numerics.md."""

    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    # --- reward shaping ---
    kl_coef: float = 0.05  # KL-penalty coefficient (fixed) or its start (adaptive)
    adaptive_kl: bool = False  # Ziegler et al. controller towards kl_target
    kl_target: float = 6.0  # target sequence KL (nats) of the adaptive controller
    kl_horizon: float = 10000.0  # samples over which the adaptive controller corrects
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # per-token KL in the reward
    missing_eos_score: float | None = None  # score for responses without EOS (e.g. -1.0)
    score_clip: float | None = None  # clip scores to [-c, c]
    whiten_rewards: bool = False  # scale-only whitening of the shaped rewards before GAE
    # --- advantages ---
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    # --- update ---
    epochs: int = 4  # passes over the rollout, fresh shuffle each
    num_minibatches: int = 4  # optimizer steps per epoch; must divide the batch size
    clip_eps: float = 0.2  # policy ratio clip
    clip_eps_low: float | None = None  # asymmetric clip overrides
    clip_eps_high: float | None = None
    dual_clip: float | None = None  # dual-clip constant c > 1 (Ye et al. 2020)
    value_clip_eps: float | None = 0.2  # value clip around the rollout values; None = off
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    aggregation: str = "token_mean"  # reduction of the per-token losses

    def __post_init__(self):
        check_in(self.kl_estimator, KL_ESTIMATORS, "kl_estimator")
        check_aggregation(self.aggregation)
        for name in ("epochs", "num_minibatches", "clip_eps", "kl_target", "kl_horizon"):
            check_positive(getattr(self, name), name)
        for name in ("kl_coef", "vf_coef", "ent_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)}")
        # optional settings, checked here (as the losses would after the first rollout)
        for name in ("clip_eps_low", "clip_eps_high", "value_clip_eps", "score_clip"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"`dual_clip` must be > 1 (or None: off), got {self.dual_clip}")
        check_finite_score(self.missing_eos_score, "missing_eos_score")


def kl_controller(config: PPOConfig) -> KLController:
    """The adaptive (Ziegler et al. 2019) or fixed KL-coefficient controller of `config`."""
    if config.adaptive_kl:
        return adaptive_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
    return fixed_kl_controller(config.kl_coef)


def value_params_from_reward_model(reward_params):
    """Value-model parameters from a `RewardModel`'s: same decoder, score head set to zero.

    Both models share the layout `{"decoder", "score": {"kernel", "bias"}}`; a zero head makes
    the first value estimates 0 (docs/numerics.md: value model initialised from the reward model,
    value head initialised to zero). The arrays are copies, so donating the value state never
    invalidates `reward_params`.
    """
    if set(reward_params) != {"decoder", "score"}:
        raise ValueError(f"`reward_params` must have keys decoder, score; got {sorted(reward_params)}")
    return {
        "decoder": jax.tree.map(jnp.copy, reward_params["decoder"]),
        "score": jax.tree.map(jnp.zeros_like, reward_params["score"]),
    }


def _policy_loss(params, apply_fn, batch: Rollout, config: PPOConfig):
    flat = flatten_responses
    response_length = batch.response_ids.shape[-1]
    current = policy_logprobs(apply_fn, params, batch.batch, temperature=config.sampling.temperature,
                              kept_threshold=batch.kept_threshold, with_entropy=True)
    mask = flat(batch.response_mask)
    loss, metrics = ppo_policy_loss(
        flat(current.logprobs), flat(batch.logp), flat(batch.advantages), mask, clip_eps=config.clip_eps,
        clip_eps_low=config.clip_eps_low, clip_eps_high=config.clip_eps_high,
        dual_clip=config.dual_clip, aggregation=config.aggregation, max_len=response_length,
    )
    if config.ent_coef > 0:  # entropy bonus -aggregate(H) (rlhf_jax.losses.entropy)
        bonus = -aggregate(flat(current.entropy), mask, config.aggregation, max_len=response_length)
        loss = loss + config.ent_coef * bonus
    metrics["ppo/entropy"] = masked_mean(jax.lax.stop_gradient(current.entropy), current.mask)
    return loss, metrics


def _value_loss(params, apply_fn, batch: Rollout, config: PPOConfig):
    flat = flatten_responses
    mask = flat(batch.response_mask)
    values = flat(response_values(apply_fn, params, batch.batch))
    loss, metrics = value_loss(values, flat(batch.values), flat(batch.returns), mask,
                               value_clip_eps=config.value_clip_eps, aggregation=config.aggregation,
                               max_len=mask.shape[1])
    return config.vf_coef * loss, metrics


def ppo_update(policy_state, value_state, data: Rollout, rng, *, config: PPOConfig):
    """All `epochs x num_minibatches` PPO steps on one rollout, in one `lax.scan`.

    Each epoch draws a fresh permutation of the B prompts (a PPO rollout holds N = 1 response
    per prompt, `[B, 1, R]`) and cuts it into `num_minibatches` minibatches. On each minibatch the policy takes one optimizer step on
    `ppo_policy_loss + ent_coef * entropy_loss` and the value model one on
    `vf_coef * value_loss` (the two networks share no parameters, so this equals one step on
    the summed loss). Log-probs use `logits / sampling.temperature`, as in the rollout.

    Args:
      policy_state: `TrainState` of the `CausalLM` policy (donate it).
      value_state: `TrainState` of the `ValueModel` (donate it).
      data: a `Rollout` with `logp`, `values`, `advantages` and `returns` (from `rollout`).
      rng: PRNG key for the shuffles.
      config: `PPOConfig` (static).

    Returns:
      `(policy_state, value_state, metrics)`; metrics are means over all minibatch steps of
      `ppo/*` (policy_loss, clipfrac, approx_kl, ratio_mean, entropy...), `value/*` (loss,
      clipfrac, mean, explained_variance), `optim/policy_grad_norm`, `optim/value_grad_norm`,
      plus `rollout_metrics(data)` (objective/kl, objective/scores, ...).
    """
    for name in ("values", "advantages", "returns"):
        if getattr(data, name) is None:
            raise ValueError(f"`ppo_update` needs a rollout with `{name}` (use `rollout(...)`)")
    batch_size = data.prompt_ids.shape[0]
    if batch_size % config.num_minibatches:
        raise ValueError(f"the rollout's {batch_size} rows do not split into "
                         f"`num_minibatches` = {config.num_minibatches} equal minibatches")
    minibatch_size = batch_size // config.num_minibatches
    shuffles = jax.vmap(lambda key: jax.random.permutation(key, batch_size))(
        jax.random.split(rng, config.epochs))  # [E, B]
    minibatch_rows = shuffles.reshape(config.epochs * config.num_minibatches, minibatch_size)
    policy_grad_fn = jax.value_and_grad(_policy_loss, has_aux=True)
    value_grad_fn = jax.value_and_grad(_value_loss, has_aux=True)

    def minibatch_step(states, rows):
        policy_state, value_state = states
        batch = jax.tree.map(lambda x: x[rows], data)
        (policy_loss, metrics), policy_grads = policy_grad_fn(
            policy_state.params, policy_state.apply_fn, batch, config)
        (weighted_value_loss, value_metrics), value_grads = value_grad_fn(
            value_state.params, value_state.apply_fn, batch, config)
        metrics.update(value_metrics)
        metrics["ppo/total_loss"] = policy_loss + weighted_value_loss
        metrics["optim/policy_grad_norm"] = optax.global_norm(policy_grads)
        metrics["optim/value_grad_norm"] = optax.global_norm(value_grads)
        states = (policy_state.apply_gradients(grads=policy_grads),
                  value_state.apply_gradients(grads=value_grads))
        return states, metrics

    (policy_state, value_state), metrics = jax.lax.scan(
        minibatch_step, (policy_state, value_state), minibatch_rows)
    metrics = {name: jnp.mean(value) for name, value in metrics.items()}
    metrics.update(rollout_metrics(data))
    return policy_state, value_state, metrics


def ppo_generate(policy_state, value_state, ref_params, prompt_ids, prompt_mask, rng, *,
                 config: PPOConfig, reward_module=None, reward_params=None, score_fn=None) -> Rollout:
    """Generate phase (jittable): sample responses, policy and reference log-probs, values.

    `scores` come from the in-jit scorer when one is given (`reward_module` + `reward_params`
    or `score_fn`), else stay None for the host to compute and pass to `ppo_train`.
    """
    data = generate_rollout(policy_state, prompt_ids, prompt_mask, rng, sampling=config.sampling)
    data = rollout_logprobs(data, policy_state, ref_params, sampling=config.sampling,
                            value_state=value_state)
    if reward_module is not None or score_fn is not None:
        data = with_scores(data, rollout_scores(data, reward_module=reward_module,
                                                reward_params=reward_params, score_fn=score_fn))
    return data


def ppo_train(policy_state, value_state, kl_state, data: Rollout, scores, rng, *, config: PPOConfig):
    """Update phase (jittable): `scores` `[B, 1]` (or `[B]`) float32 -> shaped rewards, GAE (`ppo_advantages`
    with `kl_state.coef`) -> `ppo_update` -> KL-controller update.

    `data` is a `ppo_generate` rollout; `scores` may come from the host (reward functions on
    decoded text) or from an in-jit scorer. Returns `(policy_state, value_state, kl_state,
    metrics)` as `ppo_iteration`.
    """
    data = with_scores(data, scores)
    if data.values is None:
        data = data.replace(values=jnp.zeros(data.response_mask.shape, jnp.float32))
    no_reference = data.ref_logp is None  # no KL to shape with (kl_coef 0): none is logged
    if no_reference:
        data = data.replace(ref_logp=data.kl_logp)
    data = ppo_advantages(
        data, kl_coef=kl_state.coef, kl_estimator=config.kl_estimator, gamma=config.gamma,
        gae_lambda=config.gae_lambda, whiten_rewards=config.whiten_rewards,
        whiten_advantages=config.whiten_advantages, missing_eos_score=config.missing_eos_score,
        score_clip=config.score_clip,
    )
    policy_state, value_state, metrics = ppo_update(policy_state, value_state, data, rng, config=config)
    metrics["objective/kl_coef"] = jnp.asarray(kl_state.coef, jnp.float32)
    kl = metrics.pop("objective/kl") if no_reference else metrics["objective/kl"]
    kl_state = kl_controller(config).update(kl_state, kl, n_steps=data.prompt_ids.shape[0])
    return policy_state, value_state, kl_state, metrics


def ppo_iteration(policy_state, value_state, kl_state, ref_params, prompt_ids, prompt_mask, rng, *,
                  config: PPOConfig, reward_module=None, reward_params=None, score_fn=None):
    """One PPO iteration with an in-jit scorer: `ppo_generate` -> `ppo_train`
    (rollout -> `ppo_update` -> KL-controller update).

    Args:
      policy_state, value_state: train states of the `CausalLM` policy and the `ValueModel`.
      kl_state: `KLControllerState` of `kl_controller(config)`; its `coef` shapes the rewards.
      ref_params: frozen reference-policy parameters (same module as the policy); None runs
        no reference (no KL in the rewards, no `objective/kl`: for `kl_coef` 0).
      prompt_ids, prompt_mask: `[B, P]` left-padded prompt batch.
      rng: PRNG key (split into the sampling key and the shuffle key).
      config: `PPOConfig` (static).
      reward_module, reward_params: a `RewardModel` (static) and its parameters, or
      score_fn: a traceable `score_fn(prompt_ids, response_ids, response_mask) -> [B]` (static).
        For Python scorers on text, call the two phases with host scoring in between instead.

    Returns:
      `(policy_state, value_state, kl_state, metrics)`; metrics are those of `ppo_update` plus
      `objective/kl_coef` (the coefficient used for this rollout).
    """
    if reward_module is None and score_fn is None:
        raise ValueError("give exactly one of `reward_module` (with `reward_params`) and `score_fn`")
    sample_key, shuffle_key = jax.random.split(rng)
    data = ppo_generate(policy_state, value_state, ref_params, prompt_ids, prompt_mask, sample_key,
                        config=config, reward_module=reward_module, reward_params=reward_params,
                        score_fn=score_fn)
    return ppo_train(policy_state, value_state, kl_state, data, data.scores, shuffle_key, config=config)


__all__ = [
    "PPO_STATIC_ARGNAMES", "PPO_TRAIN_STATIC_ARGNAMES", "PPOConfig", "kl_controller",
    "value_params_from_reward_model", "ppo_update", "ppo_generate", "ppo_train", "ppo_iteration",
]
