"""RLHF rollouts: sample responses, score them, and turn scores into PPO advantages.

Layout (the `LMBatch` layout of `rlhf_jax.training.logprobs`): a rollout of `B` left-padded
prompts `[B, P]` holds `N` sampled responses per prompt, `response_ids [B, N, R]`
right-padded (`R = max_new_tokens`): N = 1 for PPO, N = G for GRPO / RLOO groups. Per-token
arrays (`logp`, `ref_logp`, `values`, `rewards`, PPO `advantages`, `returns`) are
`[B, N, R]`; per-response arrays (`scores`, `has_eos`, GRPO `advantages`) are `[B, N]`.

    generate_rollout   sample N responses per prompt with the KV-cache `generate`
                       (`num_samples=N`: each prompt's prefill runs once and the N
                       continuations share its cache); `response_mask` is 1 up to and
                       including the first EOS
    rollout_logprobs   policy log-probs under the sampling distribution (recomputed by a
                       forward pass, or the sampler's own, see below), reference log-probs,
                       values of a `ValueModel`: every pass runs each prompt once for its N
                       responses (`response_logprobs` / `response_hidden_states`)
    rollout_scores     the sequence scores `[B, N]` of a `RewardModel` or of a `score_fn`
    ppo_advantages     `shape_rewards` (-kl_coef * KL per token, score on the last response
                       token, optional missing-EOS score) -> optional reward whitening (scale
                       only) -> `gae` -> advantage whitening (mean shift), over the `B * N`
                       responses

`rollout(...)` chains them (`score_rollout` = `rollout_logprobs` + `rollout_scores`).

Log-prob source (`SamplingConfig.logprobs_source`): `"forward"` (default) recomputes the
rollout policy's log-probs with the forward pass the PPO / GRPO update repeats
(`policy_logprobs`), so the first minibatch starts at ratio 1 bit for bit; `"generate"` keeps
the sampler's log-probs (KV-cache path, same temperature) and saves that pass. The two agree
to float32 rounding (~1e-6 on the test model; tested at 1e-4); in bfloat16 the forward pass
is the safer choice.

Sampler-trainer consistency (`SamplingConfig.kept_set_logprobs`, on by default when top-k or
top-p is active): a top-k / top-p sampler draws from the kept set renormalised, so the
rollout stores each token's kept-set threshold (`kept_threshold [B, N, R]`, midway between
the smallest kept and the largest excluded `logit / T`) and every policy log-prob of the rollout and of the update is
`z_y - logsumexp_{z_v >= t} z_v` (`rlhf_jax.ops.kept_set`): the ratios compare the
distribution the tokens came from. It runs on the same blocked LM head as the plain log-probs
(`response_logprobs(kept_threshold=)`), never holding `[B, N, R, V]` logits. The KL to the
reference compares full distributions: the reference's log-probs are those of its
`softmax(logits / T)`, and the policy's side of every KL (PPO's reward shaping and
`objective/kl`, GRPO's k3 term) reads `full_logp`, the same tokens under the policy's
unfiltered `softmax(logits / T)` from the same pass, so the KL is 0 at the reference whatever
the filters (TRL's and verl's KL). Off (or without filters), log-probs are those of
`softmax(logits / T)` and `full_logp` is None (it is `logp`).

Where scoring runs. Inside one jit (`score_rollout`, `rollout`, `grpo_iteration`,
`ppo_iteration`), scores come from exactly one of:
- `reward_module` (a `RewardModel`, static) with `reward_params`: the score head read at each
  response's last real token (the EOS token when there is one), each prompt run once;
- `score_fn(prompt_ids [B*N, P], response_ids [B*N, R], response_mask [B*N, R]) -> [B*N]`, a
  static, hashable JAX-traceable function (verifiable rewards written in JAX) called on the
  responses flattened row-major (row `b*N + n` is response n of prompt b, its prompt
  repeated); the result is laid out `[B, N]`.
Python scorers on decoded text (reward functions, `rlhf_jax.rewards`) run on the HOST between
two jitted phases instead: a generate phase (`generate_rollout` + `rollout_logprobs`; in GRPO
`grpo_generate`, in PPO `ppo_generate`) returns the rollout, the host decodes it and calls the
functions, and an update phase (`grpo_train` / `ppo_train`) takes the `scores` (`[B, N]`, or
`[B * N]` in the flattened row order above) float32.
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

from rlhf_jax.models.generation import _is_token_id, generate
from rlhf_jax.models.sampling import validate_sampling_options
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.ops.advantages import gae
from rlhf_jax.ops.checks import check_in, check_positive, check_rank, check_same_shape
from rlhf_jax.ops.masking import masked_sum, masked_whiten
from rlhf_jax.ops.rewards import shape_rewards
from rlhf_jax.training.logprobs import (LMBatch, ResponseLogprobs, response_hidden_states,
                                        response_logprobs, response_states_at)
from rlhf_jax.training.lora_state import inference_model, is_lora_state

LOGPROB_SOURCES = ("forward", "generate")


def _token_id(value, name: str) -> int:
    """`value` as a Python int token id (>= 0), or a ValueError naming `name`."""
    if not _is_token_id(value) or value < 0:
        raise ValueError(f"`{name}` must be a token id (an int >= 0) or None, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How responses are sampled (frozen, so it can be a static jit argument)."""

    max_new_tokens: int = 32  # R: response slots per response (fixed padded shape)
    temperature: float = 1.0  # T: sampling and every PPO/GRPO log-prob use logits / T
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    greedy: bool = False
    # The ids a response stops at and the pad id. None: not given; `generate_rollout` needs
    # both (the pipeline fills them from the tokenizer and the model's generation_config.json,
    # see `rlhf_jax.pipeline.stages.skeletons`). Several stop ids (a tuple; a list is stored
    # as a tuple): any of them ends a response, as for a chat model that ends its turn with
    # its own token (Gemma's `<end_of_turn>`, Llama 3's `<|eot_id|>`) besides the EOS.
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None  # fills the slots after EOS; may equal eos_token_id (masks say what is real)
    logprobs_source: Literal["forward", "generate"] = "forward"  # see the module docstring
    # Score tokens under the kept set they were drawn from (module docstring); None = on
    # exactly when top-k or top-p filtering is active (and not greedy).
    kept_set_logprobs: bool | None = None

    def __post_init__(self):
        # NumPy integers (e.g. read from an array) are stored as Python ints: the config is a
        # static jit argument, so it must hash and compare as plain values
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if _is_token_id(value):  # an integer that is not a bool
                object.__setattr__(self, name, int(value))
        check_positive(self.max_new_tokens, "max_new_tokens")
        validate_sampling_options(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, greedy=self.greedy)
        check_in(self.logprobs_source, LOGPROB_SOURCES, "logprobs_source")
        if self.kept_set_logprobs not in (None, True, False):
            raise ValueError(f"`kept_set_logprobs` must be None, True or False, got {self.kept_set_logprobs!r}")
        if self.pad_token_id is not None:
            object.__setattr__(self, "pad_token_id", _token_id(self.pad_token_id, "pad_token_id"))
        eos = self.eos_token_id
        if eos is not None and not _is_token_id(eos):
            if isinstance(eos, (str, bytes)) or not hasattr(eos, "__iter__"):
                raise ValueError(f"`eos_token_id` must be a token id (an int >= 0), a tuple of them or None, got {eos!r}")
            ids = tuple(_token_id(i, "eos_token_id") for i in eos)
            if not ids:
                raise ValueError("`eos_token_id` is an empty list; give at least one stop id, or None")
            object.__setattr__(self, "eos_token_id", tuple(dict.fromkeys(ids)))  # first occurrences, in order
        elif eos is not None:
            object.__setattr__(self, "eos_token_id", _token_id(eos, "eos_token_id"))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a response (`eos_token_id` as a tuple; empty when None)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    @property
    def replays_kept_set(self) -> bool:
        """Whether rollouts record kept-set thresholds and log-probs use them."""
        if self.kept_set_logprobs is None:
            return (self.top_k > 0 or self.top_p < 1.0) and not self.greedy
        return self.kept_set_logprobs


@struct.dataclass
class Rollout:
    """Sampled responses in the `LMBatch` layout and everything the update reads (a pytree).

    Fields a stage has not filled are None. Indexing the leading axis selects whole prompt
    groups (how update minibatches are formed).
    """

    prompt_ids: Any  # [B, P] int32, left-padded
    prompt_mask: Any  # [B, P] int32
    response_ids: Any  # [B, N, R] int32, pad after the first EOS
    response_mask: Any  # [B, N, R] int32: 1 up to and including the first EOS
    has_eos: Any  # [B, N] bool: the response ended with an EOS token
    logp: Any  # [B, N, R] float32: rollout-policy log-probs (0 on padding)
    kept_threshold: Any = None  # [B, N, R] float32: kept-set thresholds (module docstring)
    full_logp: Any = None  # [B, N, R] float32: with kept_threshold, logp under the unfiltered softmax
    ref_logp: Any = None  # [B, N, R] float32: reference log-probs (0 on padding)
    values: Any = None  # [B, N, R] float32: V(state before response token j)
    scores: Any = None  # [B, N] float32: reward-model / score_fn / host scores
    rewards: Any = None  # [B, N, R] float32: shaped per-token rewards (before any whitening)
    advantages: Any = None  # [B, N, R] (PPO) or [B, N] (GRPO) float32
    returns: Any = None  # [B, N, R] float32: value targets A + V (before advantage whitening)

    @property
    def batch(self) -> LMBatch:
        return LMBatch(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)

    @property
    def kl_logp(self):
        """The rollout policy's log-probs that a KL to the reference compares: `full_logp`
        (the unfiltered softmax's) when the kept set is replayed, else `logp`."""
        return self.logp if self.full_logp is None else self.full_logp

    @property
    def num_responses(self) -> int:
        return self.response_ids.shape[1]

    def flat_responses(self):
        """`(prompt_ids [B*N, P], response_ids [B*N, R], response_mask [B*N, R])`: one row
        per response, row `b*N + n` (its prompt repeated)."""
        num = self.num_responses
        return (jnp.repeat(self.prompt_ids, num, axis=0), flatten_responses(self.response_ids),
                flatten_responses(self.response_mask))


def flatten_responses(x):
    """`[B, N, ...]` -> `[B * N, ...]` (row `b*N + n`)."""
    return jnp.reshape(x, (-1, *jnp.shape(x)[2:]))


def sampled_batch(input_ids, attention_mask, response_mask) -> LMBatch:
    """The `LMBatch` (N = 1) of rows `[B, P + R]` that hold a left-padded prompt followed by a
    sampled response (`generate`'s tokens), `response_mask [B, R]` marking the response."""
    prompt_length = input_ids.shape[1] - response_mask.shape[1]
    return LMBatch(input_ids[:, :prompt_length], attention_mask[:, :prompt_length],
                   input_ids[:, None, prompt_length:], response_mask[:, None])


def causal_lm_of(apply_fn) -> CausalLM:
    """The `CausalLM` behind a train state's `apply_fn` (`create_train_state(module, ...)`)."""
    module = getattr(apply_fn, "__self__", None)
    if not isinstance(module, CausalLM):
        raise ValueError(
            "the policy state's `apply_fn` must be `CausalLM(...).apply` (build it with "
            f"create_train_state(CausalLM(config), ...)), got {apply_fn!r}"
        )
    return module


def sampling_model(policy_state):
    """`(model, params)` the sampler runs: the state's `CausalLM` and `params`, or for a LoRA
    state (`rlhf_jax.training.lora_state`) its `LoRAModel` with base and adapters (no dropout)."""
    if is_lora_state(policy_state):
        return inference_model(None, policy_state)
    return causal_lm_of(policy_state.apply_fn), policy_state.params


def policy_logprobs(apply_fn, params, batch: LMBatch, *, temperature=1.0, kept_threshold=None,
                    with_entropy: bool = False, prompt_once: bool = True) -> ResponseLogprobs:
    """Policy log-probs `[B, N, R]` as rollouts and updates score them, each prompt run once
    (`prompt_once`, see `response_logprobs`).

    Without `kept_threshold`: those of `softmax(logits / T)`. With it (`[B, N, R]`, module
    docstring): the log-prob and entropy of the kept set renormalised, on the same LM head as
    the plain path (`response_logprobs(kept_threshold=)`: blocks of positions, no
    `[B, N, R, V]` logits beyond the small "auto" case).
    """
    return response_logprobs(apply_fn, params, batch, temperature=temperature, with_entropy=with_entropy,
                             prompt_once=prompt_once, kept_threshold=kept_threshold)


def response_values(apply_fn, params, batch: LMBatch):
    """`ValueModel` estimates `[B, N, R]` of the state before each response token (0 on
    padding), each prompt run once."""
    hidden = response_hidden_states(apply_fn, params, batch).predicting
    values = apply_fn({"params": params}, hidden, method="scores_from_hidden")
    return jnp.where(jnp.asarray(batch.response_mask) != 0, values, 0.0)


def reward_model_scores(reward_module, reward_params, batch: LMBatch):
    """`RewardModel` scores `[B, N]`: the score head at each response's last real token (the
    EOS token when there is one), each prompt run once."""
    last = jnp.maximum(jnp.sum(jnp.asarray(batch.response_mask, jnp.int32), axis=-1) - 1, 0)  # [B, N]
    hidden = response_states_at(reward_module.apply, reward_params, batch, last)  # [B, N, D]
    return reward_module.apply({"params": reward_params}, hidden, method="scores_from_hidden")


def host_scorer(fn: Callable) -> Callable:
    """A traceable `score_fn` that runs the host function `fn` through `jax.pure_callback`.

    `fn(prompt_ids, response_ids, response_mask)` receives NumPy arrays (one row per
    response, module docstring) and returns one score per row. Create the wrapper once and
    reuse it: it is a static jit argument, hashed by identity.
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


def generate_rollout(policy_state, prompt_ids, prompt_mask, rng, *, sampling: SamplingConfig,
                     num_responses: int = 1) -> Rollout:
    """Sample `num_responses` responses per prompt; `logp` holds the sampler's log-probs.

    Args:
      policy_state: train state (or anything with `apply_fn`, `params`) of a `CausalLM`.
      prompt_ids, prompt_mask: `[B, P]` LEFT-padded prompts and their mask.
      rng: PRNG key for sampling.
      sampling: a `SamplingConfig` (static).
      num_responses: N responses per prompt (static); the prefill runs once per prompt.

    Returns a `Rollout` `[B, N, R]` with `logp` (the kept-set log-probs and `kept_threshold`
    when `sampling.replays_kept_set`).
    """
    check_rank(prompt_ids, 2, "prompt_ids")
    check_same_shape(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    for name in ("eos_token_id", "pad_token_id"):
        if getattr(sampling, name) is None:
            raise ValueError(f"`SamplingConfig.{name}` must be set to the tokenizer's id to sample responses")
    kept = sampling.replays_kept_set
    out = generate(
        *sampling_model(policy_state), prompt_ids, prompt_mask, rng,
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_k=sampling.top_k, top_p=sampling.top_p, greedy=sampling.greedy,
        eos_token_id=sampling.eos_token_id, pad_token_id=sampling.pad_token_id,
        num_samples=num_responses, kept_set=kept,
    )
    grouped = lambda x: x.reshape(prompt_ids.shape[0], num_responses, *x.shape[1:])
    response_mask = out.mask.astype(jnp.int32)
    logp = out.kept_logprobs if kept else out.logprobs
    return Rollout(
        prompt_ids=prompt_ids.astype(jnp.int32),
        prompt_mask=prompt_mask.astype(jnp.int32),
        response_ids=grouped(out.tokens),
        response_mask=grouped(response_mask),
        has_eos=grouped(out.finished),
        logp=grouped(jnp.where(response_mask != 0, logp, 0.0)),
        kept_threshold=grouped(jnp.where(response_mask != 0, out.kept_threshold, -jnp.inf)) if kept else None,
        full_logp=grouped(jnp.where(response_mask != 0, out.logprobs, 0.0)) if kept else None,
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

    `ref_params` are parameters of the policy's module (the frozen reference policy). Each
    prompt runs once per forward pass for its N responses.
    """
    batch, temperature = data.batch, sampling.temperature
    if sampling.logprobs_source == "forward":
        scored = policy_logprobs(policy_state.apply_fn, policy_state.params, batch, temperature=temperature,
                                 kept_threshold=data.kept_threshold)
        data = data.replace(logp=scored.logprobs,
                            full_logp=None if data.kept_threshold is None else scored.full_logprobs)
    if ref_params is not None:
        data = data.replace(ref_logp=response_logprobs(policy_state.apply_fn, ref_params, batch,
                                                       temperature=temperature).logprobs)
    if value_state is not None:
        data = data.replace(values=response_values(value_state.apply_fn, value_state.params, batch))
    return data


def rollout_scores(data: Rollout, *, reward_module=None, reward_params=None, score_fn=None):
    """Sequence scores `[B, N]` of an in-jit scorer: exactly one of `reward_module` +
    `reward_params`, or `score_fn` (module docstring)."""
    _check_scorer(reward_module, reward_params, score_fn)
    if reward_module is not None:
        return reward_model_scores(reward_module, reward_params, data.batch)
    scores = score_fn(*data.flat_responses())
    count = data.response_ids.shape[0] * data.num_responses
    if jnp.shape(scores) != (count,):
        raise ValueError(f"the scorer must return shape ({count},) (one score per response), "
                         f"got {jnp.shape(scores)}")
    return jnp.reshape(scores, data.response_ids.shape[:2])


def with_scores(data: Rollout, scores) -> Rollout:
    """`data` with `scores` `[B, N]` float32, however computed: in jit (`rollout_scores`) or on
    the host between a generate phase and an update phase. A flat `[B * N]` array is read in
    the row order of `Rollout.flat_responses` (response n of prompt b at `b*N + n`)."""
    shape = tuple(data.response_ids.shape[:2])
    if jnp.shape(scores) == (shape[0] * shape[1],):
        scores = jnp.reshape(scores, shape)
    if jnp.shape(scores) != shape:
        raise ValueError(f"the scorer must return shape {shape} (or ({shape[0] * shape[1]},)), "
                         f"got {jnp.shape(scores)}")
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


def ppo_advantages(data: Rollout, *, kl_coef, kl_estimator="k1", gamma=1.0, gae_lambda=0.95,
                   whiten_rewards=False, whiten_advantages=True, missing_eos_score=None,
                   score_clip=None) -> Rollout:
    """Per-token rewards, GAE advantages and returns (docs/numerics.md, PPO for language models).

        r_t = -kl_coef * KL_t + [t == last] * score          (shape_rewards)
        r <- r / std(r) (+ mean kept)                         (whiten_rewards)
        A, R = gae(r, V, mask; gamma, gae_lambda), V after the last token = 0, R = A + V
        A <- (A - mean(A)) / std(A)                           (whiten_advantages)

    over the `B * N` responses (whitening statistics over all their counted tokens); the
    results are `[B, N, R]`. Ziegler et al. 2019 (arXiv:1909.08593); Schulman et al. 2016
    (arXiv:1506.02438). Needs `logp`, `ref_logp`, `values` and `scores`; `rewards` keep the
    unwhitened values.
    """
    for name in ("ref_logp", "values", "scores"):
        if getattr(data, name) is None:
            raise ValueError(f"`ppo_advantages` needs `{name}`; run `score_rollout` with it first")
    flat = flatten_responses
    mask = flat(data.response_mask)
    rewards = shape_rewards(
        flat(data.scores), flat(data.kl_logp), flat(data.ref_logp), mask, kl_coef=kl_coef,
        kl_estimator=kl_estimator, has_eos=flat(data.has_eos), missing_eos_score=missing_eos_score,
        score_clip=score_clip,
    )
    gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if whiten_rewards else rewards
    advantages, returns = gae(gae_rewards, flat(data.values), mask, gamma=gamma, gae_lambda=gae_lambda)
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    grouped = lambda x: x.reshape(data.response_mask.shape)
    return data.replace(rewards=grouped(rewards), advantages=grouped(advantages), returns=grouped(returns))


def rollout(policy_state, ref_params, prompt_ids, prompt_mask, rng, *, sampling: SamplingConfig,
            kl_coef, value_state=None, reward_module=None, reward_params=None, score_fn=None,
            kl_estimator="k1", gamma=1.0, gae_lambda=0.95, whiten_rewards=False, whiten_advantages=True,
            missing_eos_score=None, score_clip=None) -> Rollout:
    """`generate_rollout` (N = 1) -> `score_rollout` -> `ppo_advantages` (see each for the
    arguments).

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
        data = data.replace(ref_logp=data.kl_logp)
    return ppo_advantages(
        data, kl_coef=kl_coef, kl_estimator=kl_estimator, gamma=gamma, gae_lambda=gae_lambda,
        whiten_rewards=whiten_rewards, whiten_advantages=whiten_advantages,
        missing_eos_score=missing_eos_score, score_clip=score_clip,
    )


def rollout_metrics(data: Rollout) -> dict[str, jax.Array]:
    """Scalar summaries of a rollout (stable names), means over its `B * N` responses:

    `objective/scores` mean score; `objective/kl` mean of the summed per-token
    `kl_logp - ref_logp` (the k1 sequence KL the adaptive controller tracks); `objective/rlhf_reward`
    mean of the summed shaped rewards; `rollout/response_length` mean counted tokens;
    `rollout/eos_rate` fraction of responses that ended with EOS.
    """
    mask = data.response_mask.astype(jnp.float32)
    metrics = {
        "rollout/response_length": jnp.mean(jnp.sum(mask, axis=-1)),
        "rollout/eos_rate": jnp.mean(data.has_eos.astype(jnp.float32)),
    }
    if data.scores is not None:
        metrics["objective/scores"] = jnp.mean(data.scores)
    if data.ref_logp is not None:
        metrics["objective/kl"] = jnp.mean(masked_sum(data.kl_logp - data.ref_logp, mask, axis=-1))
    if data.rewards is not None:
        metrics["objective/rlhf_reward"] = jnp.mean(masked_sum(data.rewards, mask, axis=-1))
    return metrics


__all__ = [
    "LOGPROB_SOURCES", "SamplingConfig", "Rollout", "flatten_responses", "sampled_batch", "causal_lm_of",
    "sampling_model",
    "policy_logprobs", "response_values", "reward_model_scores", "host_scorer", "generate_rollout",
    "rollout_logprobs", "rollout_scores", "with_scores", "score_rollout", "ppo_advantages",
    "rollout", "rollout_metrics",
]
