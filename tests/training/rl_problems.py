"""Tiny models, prompts, responses and a verifiable score shared by the RL tests (rollout, PPO,
GRPO).

Token ids: PAD = 0, EOS = 1; prompts and responses draw their tokens from 2..VOCAB-1, and the
score counts the TARGET token. The modules are built once at import; prompt and response
lengths are the tests' own.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel, ValueModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.training.state import create_train_state

VOCAB, EOS, PAD, TARGET = 16, 1, 0, 5
CONFIG = ModelConfig.llama(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                           num_kv_heads=2, intermediate_size=64)
POLICY, VALUE, REWARD = CausalLM(CONFIG), ValueModel(CONFIG), RewardModel(CONFIG)


def init_params(module, seed):
    """`module`'s parameters drawn with `jax.random.key(seed)` (their values do not depend on
    the length of the dummy input)."""
    return module.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]


POLICY_PARAMS = init_params(POLICY, 0)
# A reference policy that differs from the policy's start, so reference log-ratios are not 0.
REF_PARAMS = init_params(POLICY, 1)


def with_score_head(params, seed, scale, bias):
    """A copy of value / reward-model `params` whose score head has N(0, scale^2) weights and
    bias `bias`, so its outputs are not trivially 0."""
    kernel = jax.random.normal(jax.random.key(seed), (CONFIG.hidden_size, 1)) * scale
    return {**params, "score": {"kernel": kernel, "bias": jnp.full((1,), bias, jnp.float32)}}


def fresh_policy_state(optimizer):
    """A policy train state holding its own copy of POLICY_PARAMS (iterations donate it)."""
    return create_train_state(POLICY, jax.tree.map(jnp.array, POLICY_PARAMS), optimizer)


def target_fraction(prompt_ids, response_ids, response_mask):
    """Verifiable score: fraction of counted response tokens equal to TARGET (start ~1/16)."""
    hits = (response_ids == TARGET).astype(jnp.float32) * response_mask
    return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(response_mask, axis=1), 1)


def left_padded_prompts(seed, batch, length):
    """`(ids, mask)`, int32 NumPy `[batch, length]`: 1..length real tokens after left padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, batch)
    mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, VOCAB, (batch, length)), PAD).astype(np.int32)
    return ids, mask


def with_random_responses(rng, prompt_ids, prompt_mask, length):
    """Prompts followed by right-padded random responses of 1..length tokens drawn from `rng`:
    `(input_ids, attention_mask, response_mask)`, NumPy."""
    batch = prompt_ids.shape[0]
    lengths = rng.integers(1, length + 1, batch)
    response_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    response = np.where(response_mask == 1, rng.integers(2, VOCAB, (batch, length)), PAD)
    input_ids = np.concatenate([prompt_ids, response], axis=1).astype(np.int32)
    attention_mask = np.concatenate([prompt_mask, response_mask], axis=1)
    return input_ids, attention_mask, response_mask


@functools.partial(jax.jit, static_argnames=("prompt_length", "temperature"))
def response_logp_and_entropy(params, input_ids, attention_mask, prompt_length, temperature):
    """Independent oracle: a full-sequence POLICY forward, shifted by hand, then
    log_softmax(logits / T); the log-prob of each response token and the entropy there."""
    logits = POLICY.apply({"params": params}, input_ids, attention_mask) / temperature
    logp_all = jax.nn.log_softmax(logits[:, prompt_length - 1:-1], axis=-1)  # [B, N, V]
    logp = jnp.take_along_axis(logp_all, input_ids[:, prompt_length:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
