"""RLHF rollouts: sample responses, score them, and turn scores into PPO advantages.

One rollout of a left-padded prompt batch `[B, P]` runs, all on device and inside one jit:

    generate_rollout   sample N new tokens per prompt (KV-cache `generate`), join prompt and
                       response into `input_ids [B, P + N]`; `response_mask [B, N]` is 1 up to
                       and including the first EOS, 0 on the pad slots after it
    score_rollout      policy log-probs of the response tokens under `softmax(logits / T)`
                       (recomputed by a forward pass, or the sampler's own, see below),
                       reference log-probs, values of a `ValueModel`, and the sequence score of
                       a `RewardModel` or of a user `score_fn`
    ppo_advantages     `shape_rewards` (-kl_coef * KL per token, score on the last response
                       token, optional missing-EOS score) -> optional reward whitening (scale
                       only) -> `gae` -> advantage whitening (mean shift)

`rollout(...)` chains the three. All forward passes project to the vocabulary only at the
`N` positions that predict response tokens (`P - 1 .. P + N - 2`), never over the prompt.

Log-prob source (`SamplingConfig.logprobs_source`): `"forward"` (default) recomputes the
rollout policy's log-probs with a full forward pass, exactly the computation the PPO update
repeats, so the first minibatch starts at ratio 1 bit for bit; `"generate"` keeps the
sampler's log-probs (KV-cache path, same temperature) and saves that pass. The two agree to
float32 rounding (~1e-6 on the test model; tested at 1e-4); in bfloat16 the forward pass is
the safer choice.

Where scoring runs. Inside one jit (`score_rollout`, `rollout`, `grpo_iteration`,
`ppo_iteration`), scores come from exactly one of:
- `reward_module` (a `RewardModel`, static) with `reward_params`: the score head read at the
  last non-pad token of prompt + response (the EOS token when there is one);
- `score_fn(prompt_ids [B, P], response_ids [B, N], response_mask [B, N]) -> [B]`, a static,
  hashable JAX-traceable function (verifiable rewards written in JAX).
Python scorers on decoded text (reward functions, `rlhf_jax.rewards`) run on the HOST between
two jitted phases instead: a generate phase (`generate_rollout` + `rollout_logprobs`; in GRPO
`grpo_generate`, in PPO `ppo_generate`) returns the rollout, the host decodes it and calls the
functions, and an update phase (`grpo_train` / `ppo_train`) takes the `scores` `[B]` float32.
Each phase compiles once; errors in a reward function are ordinary Python exceptions. This is
how `rlhf-jax grpo` / `ppo` score. `host_scorer(fn)` (a `jax.pure_callback`) remains for
custom loops that want one compiled program with a NumPy scorer; an exception inside it
surfaces as a runtime error of the callback.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rlhf_jax.models.generation import generate
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.ops.advantages import gae
from rlhf_jax.ops.checks import check_in, check_positive, check_rank, check_same_shape
from rlhf_jax.ops.logprobs import token_logprobs
from rlhf_jax.ops.masking import masked_sum, masked_whiten
from rlhf_jax.ops.rewards import shape_rewards

LOGPROB_SOURCES = ("forward", "generate")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (frozen, so it can be a static jit argument)."""

    max_new_tokens: int = 32  # N: response slots per prompt (fixed padded shape)
    temperature: float = 1.0  # T: sampling and every PPO/GRPO log-prob use logits / T
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False
    eos_token_id: int = 1  # must differ from pad_token_id
    pad_token_id: int = 0
    logprobs_source: Literal["forward", "generate"] = "forward"  # see the module docstring

    def __post_init__(self):
        check_positive(self.max_new_tokens, "max_new_tokens")
        check_positive(self.temperature, "temperature")
        check_in(self.logprobs_source, LOGPROB_SOURCES, "logprobs_source")
        if self.eos_token_id == self.pad_token_id:
            raise ValueError(f"`eos_token_id` and `pad_token_id` must differ, both are {self.pad_token_id}")


@struct.dataclass
class Rollout:
    """A batch of sampled responses and everything the update reads (a pytree).

    Token arrays over prompt + response are `[B, P + N]`; response arrays are `[B, N]` with
    `response[:, j] = input_ids[:, P + j]`. Fields a stage has not filled are None.
    """

    input_ids: Any  # [B, P+N] int32: left-padded prompt, then the right-padded response
    attention_mask: Any  # [B, P+N] int32: prompt mask, then response_mask
    response_mask: Any  # [B, N] int32: 1 up to and including the first EOS
    has_eos: Any  # [B] bool: the response ended with an EOS token
    logp: Any  # [B, N] float32: rollout-policy log-probs (0 on padding)
    ref_logp: Any = None  # [B, N] float32: reference log-probs (0 on padding)
    values: Any = None  # [B, N] float32: V(state before response token j)
    scores: Any = None  # [B] float32: reward-model / score_fn scores, as returned
    rewards: Any = None  # [B, N] float32: shaped per-token rewards (before any whitening)
    advantages: Any = None  # [B, N] (PPO) or [B] (GRPO) float32
    returns: Any = None  # [B, N] float32: value targets A + V (before advantage whitening)

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    @property
    def response_ids(self):
        return self.input_ids[:, self.prompt_length:]


def causal_lm_of(apply_fn) -> CausalLM:
    """The `CausalLM` behind a train state's `apply_fn` (`create_train_state(module, ...)`)."""
    module = getattr(apply_fn, "__self__", None)
    if not isinstance(module, CausalLM):
        raise ValueError(
            "the policy state's `apply_fn` must be `CausalLM(...).apply` (build it with "
            f"create_train_state(CausalLM(config), ...)), got {apply_fn!r}"
        )
    return module


def response_hidden(apply_fn, params, input_ids, attention_mask, response_length: int):
    """Hidden states `[B, N, D]` at the positions that predict the N response tokens."""
    prompt_length = input_ids.shape[1] - response_length
    if prompt_length < 1:
        raise ValueError(f"need at least one prompt token, got input length {input_ids.shape[1]} "
                         f"for {response_length} response tokens")
    hidden = apply_fn({"params": params}, input_ids, attention_mask, method="hidden_states")
    return hidden[:, prompt_length - 1: prompt_length - 1 + response_length]  # [B, N, D]


def response_logprobs(apply_fn, params, input_ids, attention_mask, response_mask, *, temperature=1.0):
    """`(logp [B, N], logits [B, N, V])` of the response tokens under `softmax(logits / T)`.

    `logp[b, j] = log_softmax(logits(input_ids[b, :P + j]) / T)[input_ids[b, P + j]]`, 0 where
    `response_mask` is 0; `logits` are the raw (unscaled) float32 logits.
    """
    response_length = response_mask.shape[1]
    hidden = response_hidden(apply_fn, params, input_ids, attention_mask, response_length)
    logits = apply_fn({"params": params}, hidden, method="lm_logits")  # [B, N, V] float32
    response_ids = input_ids[:, input_ids.shape[1] - response_length:]
    logp = token_logprobs(logits, response_ids, temperature=temperature)
    return jnp.where(response_mask != 0, logp, 0.0), logits


def response_values(apply_fn, params, input_ids, attention_mask, response_mask):
    """`ValueModel` estimates `[B, N]` of the state before each response token (0 on padding)."""
    hidden = response_hidden(apply_fn, params, input_ids, attention_mask, response_mask.shape[1])
    values = apply_fn({"params": params}, hidden, method="scores_from_hidden")
    return jnp.where(response_mask != 0, values, 0.0)


def host_scorer(fn: Callable) -> Callable:
    """A traceable `score_fn` that runs the host function `fn` through `jax.pure_callback`.

    `fn(prompt_ids, response_ids, response_mask)` receives NumPy arrays and returns `B`
    scores. Create the wrapper once and reuse it: it is a static jit argument, hashed by
    identity.
    """

    def call_on_host(prompt_ids, response_ids, response_mask):
        scores = np.asarray(fn(np.asarray(prompt_ids), np.asarray(response_ids), np.asarray(response_mask)))
        return scores.astype(np.float32).reshape(prompt_ids.shape[0])

    @functools.wraps(fn)
    def score_fn(prompt_ids, response_ids, response_mask):
        result = jax.ShapeDtypeStruct((prompt_ids.shape[0],), jnp.float32)
        return jax.pure_callback(call_on_host, result, prompt_ids, response_ids, response_mask,
                                 vmap_method="sequential")

    return score_fn


def generate_rollout(policy_state, prompt_ids, prompt_mask, rng, *, sampling: SamplingConfig) -> Rollout:
    """Sample responses and lay out prompt + response; `logp` holds the sampler's log-probs.

    Args:
      policy_state: train state (or anything with `apply_fn`, `params`) of a `CausalLM`.
      prompt_ids, prompt_mask: `[B, P]` LEFT-padded prompts and their mask.
      rng: PRNG key for sampling.
      sampling: a `SamplingConfig` (static).
    """
    check_rank(prompt_ids, 2, "prompt_ids")
    check_same_shape(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    out = generate(
        causal_lm_of(policy_state.apply_fn), policy_state.params, prompt_ids, prompt_mask, rng,
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, greedy=sampling.greedy,
        eos_token_id=sampling.eos_token_id, pad_token_id=sampling.pad_token_id,
    )
    response_mask = out.mask.astype(jnp.int32)
    return Rollout(
        input_ids=jnp.concatenate([prompt_ids.astype(jnp.int32), out.tokens], axis=1),
        attention_mask=jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask], axis=1),
        response_mask=response_mask,
        has_eos=out.finished,
        logp=jnp.where(response_mask != 0, out.logprobs, 0.0),
    )


def _check_scorer(reward_module, reward_params, score_fn):
    if (reward_module is None) == (score_fn is None):
        raise ValueError("give exactly one of `reward_module` (with `reward_params`) and `score_fn`")
    if reward_module is not None and reward_params is None:
        raise ValueError("`reward_module` needs `reward_params`")


def rollout_logprobs(data: Rollout, policy_state, ref_params, *, sampling: SamplingConfig,
                     value_state=None) -> Rollout:
    """Fill what needs no score: `logp` (when `sampling.logprobs_source == "forward"`),
    `ref_logp` (None when `ref_params` is None) and `values` (None without `value_state`).

    `ref_params` are parameters of the policy's module (the frozen reference policy).
    """
    args = (data.input_ids, data.attention_mask, data.response_mask)
    temperature = sampling.temperature
    if sampling.logprobs_source == "forward":
        data = data.replace(logp=response_logprobs(policy_state.apply_fn, policy_state.params, *args,
                                                   temperature=temperature)[0])
    if ref_params is not None:
        data = data.replace(ref_logp=response_logprobs(policy_state.apply_fn, ref_params, *args,
                                                       temperature=temperature)[0])
    if value_state is not None:
        data = data.replace(values=response_values(value_state.apply_fn, value_state.params, *args))
    return data


def rollout_scores(data: Rollout, *, reward_module=None, reward_params=None, score_fn=None):
    """Sequence scores `[B]` of an in-jit scorer: exactly one of `reward_module` +
    `reward_params`, or `score_fn` (module docstring)."""
    _check_scorer(reward_module, reward_params, score_fn)
    if reward_module is not None:
        return reward_module.apply({"params": reward_params}, data.input_ids, data.attention_mask)
    prompt_ids = data.input_ids[:, :data.prompt_length]
    return score_fn(prompt_ids, data.response_ids, data.response_mask)


def with_scores(data: Rollout, scores) -> Rollout:
    """`data` with `scores` `[B]` (float32), however computed: in jit (`rollout_scores`) or on
    the host between a generate phase and an update phase."""
    batch = data.input_ids.shape[0]
    if jnp.shape(scores) != (batch,):
        raise ValueError(f"the scorer must return shape ({batch},), got {jnp.shape(scores)}")
    return data.replace(scores=jnp.asarray(scores, jnp.float32))


def score_rollout(data: Rollout, policy_state, ref_params, *, sampling: SamplingConfig,
                  value_state=None, reward_module=None, reward_params=None, score_fn=None) -> Rollout:
    """`rollout_logprobs` then `scores` from the in-jit scorer (`rollout_scores`).

    Give exactly one of `reward_module` + `reward_params`, or `score_fn` (module docstring).
    """
    _check_scorer(reward_module, reward_params, score_fn)
    data = rollout_logprobs(data, policy_state, ref_params, sampling=sampling, value_state=value_state)
    return with_scores(data, rollout_scores(data, reward_module=reward_module, reward_params=reward_params,
                                            score_fn=score_fn))


def ppo_advantages(data: Rollout, *, kl_coef, kl_estimator="k1", gamma=1.0, lam=0.95,
                   whiten_rewards=False, whiten_advantages=True, missing_eos_score=None,
                   score_clip=None) -> Rollout:
    """Per-token rewards, GAE advantages and returns (NUMERICS.md, PPO for language models).

        r_t = -kl_coef * KL_t + [t == last] * score          (shape_rewards)
        r <- r / std(r) (+ mean kept)                         (whiten_rewards)
        A, R = gae(r, V, mask; gamma, lam), V after the last token = 0, R = A + V
        A <- (A - mean(A)) / std(A)                           (whiten_advantages)

    Ziegler et al. 2019 (arXiv:1909.08593); Schulman et al. 2016 (arXiv:1506.02438).
    Needs `logp`, `ref_logp`, `values` and `scores`; `rewards` keep the unwhitened values.
    """
    for name in ("ref_logp", "values", "scores"):
        if getattr(data, name) is None:
            raise ValueError(f"`ppo_advantages` needs `{name}`; run `score_rollout` with it first")
    mask = data.response_mask
    rewards = shape_rewards(
        data.scores, data.logp, data.ref_logp, mask, kl_coef=kl_coef, kl_estimator=kl_estimator,
        has_eos=data.has_eos, missing_eos_score=missing_eos_score, score_clip=score_clip,
    )
    gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if whiten_rewards else rewards
    advantages, returns = gae(gae_rewards, data.values, mask, gamma=gamma, lam=lam)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return data.replace(rewards=rewards, advantages=advantages, returns=returns)


def rollout(policy_state, ref_params, prompt_ids, prompt_mask, rng, *, sampling: SamplingConfig,
            kl_coef, value_state=None, reward_module=None, reward_params=None, score_fn=None,
            kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True,
            missing_eos_score=None, score_clip=None) -> Rollout:
    """`generate_rollout` -> `score_rollout` -> `ppo_advantages` (see each for the arguments).

    Static (for `jax.jit`): `sampling`, `reward_module`, `score_fn` and the shaping options;
    `kl_coef` may be traced (a `KLControllerState.coef`). Without `value_state` the values
    are 0 (GAE then estimates advantages from rewards alone).
    """
    _check_scorer(reward_module, reward_params, score_fn)
    data = generate_rollout(policy_state, prompt_ids, prompt_mask, rng, sampling=sampling)
    data = score_rollout(data, policy_state, ref_params, sampling=sampling, value_state=value_state,
                         reward_module=reward_module, reward_params=reward_params, score_fn=score_fn)
    if data.values is None:
        data = data.replace(values=jnp.zeros(data.response_mask.shape, jnp.float32))
    if data.ref_logp is None:
        data = data.replace(ref_logp=data.logp)
    return ppo_advantages(
        data, kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma, lam=lam,
        whiten_rewards=whiten_rewards, whiten_advantages=whiten_advantages,
        missing_eos_score=missing_eos_score, score_clip=score_clip,
    )


def rollout_metrics(data: Rollout) -> dict[str, jax.Array]:
    """Scalar summaries of a rollout (stable names):

    `objective/scores` mean score; `objective/kl` mean over rows of the summed per-token
    `logp - ref_logp` (the k1 sequence KL the adaptive controller tracks); `objective/rlhf_reward`
    mean over rows of the summed shaped rewards; `rollout/response_length` mean counted tokens;
    `rollout/eos_rate` fraction of rows that ended with EOS.
    """
    mask = data.response_mask.astype(jnp.float32)
    metrics = {
        "rollout/response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "rollout/eos_rate": jnp.mean(data.has_eos.astype(jnp.float32)),
    }
    if data.scores is not None:
        metrics["objective/scores"] = jnp.mean(data.scores)
    if data.ref_logp is not None:
        metrics["objective/kl"] = jnp.mean(masked_sum(data.logp - data.ref_logp, mask, axis=1))
    if data.rewards is not None:
        metrics["objective/rlhf_reward"] = jnp.mean(masked_sum(data.rewards, mask, axis=1))
    return metrics


__all__ = [
    "LOGPROB_SOURCES", "SamplingConfig", "Rollout", "causal_lm_of", "response_hidden",
    "response_logprobs", "response_values", "host_scorer", "generate_rollout", "rollout_logprobs",
    "rollout_scores", "with_scores", "score_rollout",
    "ppo_advantages", "rollout", "rollout_metrics",
]
