"""Tiny models, fixed batches and NumPy oracles shared by the step-function tests.

Everything here is built once at import (module-level constants), and the optimizer is one
object, so jitted steps that take a `TrainState` hit the same compilation cache entry.
"""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import RewardModel
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.training.batches import KTOBatch, PreferenceBatch, SFTBatch
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.state import create_train_state

VOCAB, BATCH, TIME = 64, 8, 16
CONFIG = ModelConfig.llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=64)
POLICY = CausalLM(CONFIG)
REWARD_MODEL = RewardModel(CONFIG)
_DUMMY = jnp.zeros((1, TIME), jnp.int32)
POLICY_PARAMS = jax.device_get(POLICY.init(jax.random.key(0), _DUMMY)["params"])
# The reference differs from the policy's start, so reference log-ratios are not all zero.
REFERENCE_PARAMS = jax.device_get(POLICY.init(jax.random.key(1), _DUMMY)["params"])
REWARD_PARAMS = jax.device_get(REWARD_MODEL.init(jax.random.key(2), _DUMMY)["params"])

OPTIMIZER_CONFIG = OptimizerConfig(learning_rate=1e-2, schedule="constant", max_grad_norm=1.0,
                                   weight_decay=0.01)
OPTIMIZER = make_optimizer(OPTIMIZER_CONFIG)


def fresh_state(module, params, optimizer=OPTIMIZER):
    """A new train state holding its own copy of `params` (steps donate the state)."""
    return create_train_state(module, jax.tree.map(jnp.array, params), optimizer)


def jitted_step(step, *static_argnames):
    """`step` jitted with its `state` argument donated and `static_argnames` static."""
    return jax.jit(step, donate_argnames=("state",), static_argnames=static_argnames)


PROMPT, RESPONSE = 6, 10


def lm_rows(seed, batch=BATCH, num=1, *, max_prompt=5, max_response=8, prompt=PROMPT, response=RESPONSE):
    """`(prompt_ids, prompt_mask, response_ids, response_mask)` in the LM layout, NumPy:
    left-padded prompts `[batch, prompt]` of 2..max_prompt tokens and right-padded responses
    `[batch, num, response]` of 1..max_response tokens (different per row, so the token
    counts of any split differ); padding holds token 0."""
    rng = np.random.default_rng(seed)
    prompt_lengths = rng.integers(2, max_prompt + 1, batch)
    response_lengths = rng.integers(1, max_response + 1, (batch, num))
    prompt_mask = (np.arange(prompt)[None] >= prompt - prompt_lengths[:, None]).astype(np.int32)
    response_mask = (np.arange(response)[None, None] < response_lengths[..., None]).astype(np.int32)
    prompt_ids = rng.integers(1, VOCAB, (batch, prompt)).astype(np.int32) * prompt_mask
    response_ids = rng.integers(1, VOCAB, (batch, num, response)).astype(np.int32) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def sft_batch(seed=0):
    return SFTBatch(*lm_rows(seed))


def preference_batch(seed=0, batch=BATCH):
    return PreferenceBatch(*lm_rows(seed, batch, num=2))


def kto_batch(seed=0):
    prompt_ids, prompt_mask, response_ids, response_mask = lm_rows(seed, num=2)
    is_desirable = np.arange(BATCH) % 3 != 0
    return KTOBatch(prompt_ids, prompt_mask, response_ids[:, :1], response_mask[:, :1], is_desirable=is_desirable,
                    kl_response_ids=response_ids[:, 1:], kl_response_mask=response_mask[:, 1:])


def joined(prompt_ids, prompt_mask, response_ids, response_mask):
    """`(input_ids, attention_mask, loss_mask)` `[B, P + R]` of prompt + response rows for
    `[B, P]` prompts and `[B, R]` responses: the plain sequences the oracles run."""
    input_ids = np.concatenate([prompt_ids, response_ids], axis=1)
    attention_mask = np.concatenate([prompt_mask, response_mask], axis=1).astype(np.int32)
    loss_mask = np.concatenate([np.zeros_like(prompt_mask), response_mask], axis=1).astype(np.float32)
    return input_ids, attention_mask, loss_mask


def sequences(seed, batch=BATCH):
    """Plain `[B, P + R]` rows `(input_ids, attention_mask, loss_mask)` of `lm_rows(seed)`'s
    prompts and responses (left padding before the prompt, right padding after the response)."""
    prompt_ids, prompt_mask, response_ids, response_mask = lm_rows(seed, batch)
    return joined(prompt_ids, prompt_mask, response_ids[:, 0], response_mask[:, 0])


def response_sequences(batch, index):
    """`joined(...)` for response `index` of every row of an LM-layout batch."""
    return joined(np.asarray(batch.prompt_ids), np.asarray(batch.prompt_mask),
                  np.asarray(batch.response_ids)[:, index], np.asarray(batch.response_mask)[:, index])


# --- NumPy oracles -----------------------------------------------------------------------

def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def full_logits(params, input_ids, attention_mask):
    """Logits of every position from the model's plain forward pass of `[B, T]` sequences
    (left and/or right padding), as float64 NumPy."""
    return np.asarray(POLICY.apply({"params": params}, input_ids, attention_mask), np.float64)


def token_logps_oracle(params, input_ids, attention_mask, loss_mask):
    """`[B, T-1]` log p(token t | < t) at counted tokens (0 elsewhere) and the `[B, T-1]` mask."""
    log_probs = log_softmax(full_logits(params, input_ids, attention_mask))[:, :-1]
    labels = np.asarray(input_ids)[:, 1:]
    picked = np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    mask = np.asarray(loss_mask, np.float64)[:, 1:]
    return picked * mask, mask


def sequence_logps_oracle(params, input_ids, attention_mask, loss_mask):
    """Summed response log-probs [B] and response lengths [B]."""
    picked, mask = token_logps_oracle(params, input_ids, attention_mask, loss_mask)
    return picked.sum(axis=1), mask.sum(axis=1)


def log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))


def assert_trees_close(actual, expected, atol=1e-5, rtol=1e-5):
    leaves_a, tree_a = jax.tree.flatten(actual)
    leaves_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(leaves_a, leaves_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol)


def max_tree_difference(first, second):
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))
