"""Log-probabilities and entropy from logits.

Everything is computed in float32 whatever the logits' dtype (bfloat16 logits lose too much
precision in a log-softmax over a large vocabulary). A sampling temperature `T` divides the
logits first, so the rollout policy, the reference and the training forward pass all score
tokens under the same distribution `softmax(logits / T)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.ops.checks import check_floating, check_in, check_positive, check_token_ids

_REDUCTIONS = ("sum", "mean")


def _scaled_float32_logits(logits, temperature):
    """`logits / temperature` in float32, after checking `logits` and `temperature`."""
    check_floating(logits, "logits")
    if jnp.ndim(logits) < 1:
        raise ValueError(f"`logits` must have a vocabulary axis, got shape {jnp.shape(logits)}")
    check_positive(temperature, "temperature")
    if jnp.ndim(temperature) != 0:
        raise ValueError(f"`temperature` must be a scalar, got shape {jnp.shape(temperature)}")
    return jnp.asarray(logits, jnp.float32) / jnp.asarray(temperature, jnp.float32)


def _check_tokens(logits, tokens, name):
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"`{name}` must be an integer array, got dtype {jnp.result_type(tokens)}")
    if jnp.shape(logits)[:-1] != jnp.shape(tokens):
        raise ValueError(
            f"`logits` must have shape `{name}.shape + (vocab,)`; got logits {jnp.shape(logits)} "
            f"and {name} {jnp.shape(tokens)}"
        )


def token_logprobs(logits, tokens, *, temperature=1.0):
    """Log-probability of each token under `softmax(logits / temperature)`, aligned.

    `out[b, t] = log_softmax(logits[b, t] / T)[tokens[b, t]]`: logits at position `t` score the
    token at position `t` (no shift; see `sequence_logprobs` for the causal-LM shift).
    Computed as `logits[token] / T - logsumexp(logits / T)` in float32, which never builds the
    full `[B, T, V]` log-softmax.

    Args:
      logits: `[B, T, V]` float (any leading shape `[..., V]` works).
      tokens: `[B, T]` integer token ids in `[0, V)`, the leading shape of `logits`. An id
        outside it is a ValueError for concrete arrays (under `jax.jit` its log-prob is NaN);
        replace ignored ids (e.g. -100) before the call, as `sequence_logprobs` does.
      temperature: sampling temperature `T > 0`, a Python float or a traced scalar.

    Returns:
      `[B, T]` float32 log-probabilities.
    """
    scaled = _scaled_float32_logits(logits, temperature)
    _check_tokens(logits, tokens, "tokens")
    check_token_ids(tokens, np.ones(jnp.shape(tokens), bool), "tokens", jnp.shape(logits)[-1])
    picked = jnp.take_along_axis(scaled, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(scaled, axis=-1)


def sequence_logprobs(logits, input_ids, mask, *, temperature=1.0, reduce="sum"):
    """Log-probability of the response part of each sequence under a causal language model.

    `logp[b] = sum_{t >= 1} mask[b, t] * log_softmax(logits[b, t-1] / T)[input_ids[b, t]]`
    (the token at position `t` is predicted by the logits at `t - 1`). `reduce="mean"` divides
    by the number of counted tokens `sum_{t >= 1} mask[b, t]` (at least 1), the per-token mean
    used by IPO, SimPO and ORPO; `"sum"` is the DPO default (Rafailov et al., 2023,
    arXiv:2305.18290).

    Args:
      logits: `[B, T, V]` model outputs for `input_ids`.
      input_ids: `[B, T]` integer prompt + response tokens.
      mask: `[B, T]` 1 on the response tokens of `input_ids` that count, 0 on prompt and
        padding (bool or float). `mask[:, 0]` is ignored: nothing predicts the first token.
        Values at masked positions never leak in, even when they are `-inf` or NaN. A
        counted id outside `[0, V)` (e.g. a -100 label under mask 1) is a ValueError for
        concrete arrays (under `jax.jit` its log-prob is NaN).
      temperature: `T > 0`; the logits are divided by it before the log-softmax.
      reduce: `"sum"` or `"mean"` over counted tokens.

    Returns:
      `[B]` float32 sequence log-probabilities.
    """
    check_in(reduce, _REDUCTIONS, "reduce")
    _check_tokens(logits, input_ids, "input_ids")
    if jnp.shape(mask) != jnp.shape(input_ids):
        raise ValueError(
            f"`mask` has shape {jnp.shape(mask)} but `input_ids` has shape {jnp.shape(input_ids)}"
        )
    if jnp.ndim(input_ids) < 1 or jnp.shape(input_ids)[-1] < 2:
        raise ValueError(
            f"`input_ids` needs at least 2 time steps, got shape {jnp.shape(input_ids)}"
        )
    # a counted id outside the vocabulary (e.g. -100 under mask 1) would give a NaN log-prob
    check_token_ids(input_ids, mask, "input_ids", jnp.shape(logits)[-1], from_position=1)
    counted = jnp.asarray(mask[..., 1:], jnp.float32)
    targets = jnp.where(counted != 0, input_ids[..., 1:], 0)  # ids under mask 0 are never read
    per_token = token_logprobs(logits[..., :-1, :], targets, temperature=temperature)
    # `where` first: a pad token under -inf logits has log-prob -inf, and -inf * 0 is NaN.
    per_token = jnp.where(counted != 0, per_token, 0.0) * counted
    total = jnp.sum(per_token, axis=-1)
    if reduce == "mean":
        total = total / jnp.maximum(jnp.sum(counted, axis=-1), 1.0)
    return total


def entropy_from_logits(logits, *, temperature=1.0):
    """Entropy of `softmax(logits / T)` at every position.

    `H = -sum_v p_v log p_v = logsumexp(z) - sum_v p_v z_v` with `z = logits / T`, which stays
    finite when some probabilities underflow to 0 (no `0 * log 0`). Logits of `-inf` (a vocabulary
    masked by top-k / top-p) contribute 0, with finite gradients.

    Args:
      logits: `[B, T, V]` float (any leading shape `[..., V]` works).
      temperature: `T > 0`.

    Returns:
      `[B, T]` float32 entropies in nats.
    """
    scaled = _scaled_float32_logits(logits, temperature)
    probs = jax.nn.softmax(scaled, axis=-1)
    finite_scaled = jnp.where(jnp.isneginf(scaled), 0.0, scaled)  # p_v = 0 there
    return jax.nn.logsumexp(scaled, axis=-1) - jnp.sum(probs * finite_scaled, axis=-1)
