"""One batch layout for every language-model step, and one log-prob path over it.

Layout (`LMBatch`):

    prompt_ids, prompt_mask       [B, P]     left-padded: each row's last column is real
    response_ids, response_mask   [B, N, R]  right-padded: N responses per prompt

N is 1 for SFT, KTO and PPO, 2 for preference pairs (chosen, rejected) and G for GRPO / RLOO
groups. `response_mask` is 1 on the response tokens that exist and count (up to and
including the EOS of a sampled response); prompt tokens are never scored. Ids at padded
positions (mask 0) are never read, so they may hold anything, e.g. an ignore index of -100. Every prompt holds
at least one real token, its last column: a row with no prompt text puts its first token
(e.g. BOS) there, since nothing predicts a sequence's first token.

Log-probs (`response_logprobs`): token `j` of response `n` of row `b` is scored by the final
hidden state just before it, i.e. at the prompt's last token for `j = 0` and at response
token `j - 1` otherwise:

    logprobs[b, n, j] = log softmax(W h_{b,n,j-1} / T)[response_ids[b, n, j]]   (0 on padding)

With `prompt_once=True` (the default) the prompt runs once per row and its keys and values
reach the N responses through the KV cache (`CausalLM.shared_prefix_hidden_states`), with
gradients through the prompt; for N > 1 that removes (N - 1) prompt passes per row. With
`prompt_once=False` each response runs with its own copy of the prompt (the reference
computation, and what a per-response layout costs). Only response positions are projected
to the vocabulary. The two paths agree to float32 rounding (tested).

The LM head (`head_chunk_size`): by default (`"auto"`) the response positions are scored in
blocks by `ops.chunked_head.chunked_head_stats` (`CausalLM.output_head`), whose forward and
backward passes never hold `[B, N, R, V]` logits: a block holds about 2^24 logits
(`default_chunk_size(V)` positions; at most 110 positions for a 151,936-token vocabulary),
so the head's memory no longer grows with the tokens of a step. With a small vocabulary the
whole batch is one block. `"auto"` keeps full logits while the positions `B * N * R` are at
most the hidden size D. That rule dates from a blocked backward pass that held two float32
`[D, V]` buffers (the kernel gradient and one block's contribution: a Qwen3-0.6B-shaped
step at 512 scored positions, D = 1,024, needed 13.06 GB blocked vs 12.69 GB full); the
block's contribution is now added in vocabulary slices, and the same step needs 12.52 GB
blocked (benchmarks/RESULTS.md, "Memory"). On CPU the blocked head was not
slower (steps at V = 512 / 8,192 / 32,000: 0.85x / 0.98x / 0.80x the full head's time). An int sets the positions per block; `None` projects every
position with `lm_logits` (full float32 logits, their gradient and softmax temporaries: about
12 bytes x tokens x V). Both agree to 1e-5 in values and gradients (tested). With
`kept_threshold` (top-k / top-p rollouts, `rlhf_jax.ops.kept_set`) both heads score the kept
set renormalised: the blocks mask each block's logits, the full head uses `kept_set_logits`;
`full_logprobs` then holds the same tokens' log-probs under the unfiltered `softmax(logits / T)`
(what a KL to an unfiltered reference compares), from the same pass.
Value and reward models read the same hidden states (`response_hidden_states`); a reward
model's score of a response is read at its last real token (`response_states_at`, which runs
the last layer's queries and MLP at that token only, or `response_end_states` on states
already computed). Every path runs the last layer past its keys and values only at the
positions it returns (the prompt's last token and the responses; `Decoder(output_positions=)`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.ops.checks import (check_left_padded, check_positive, check_prompted_responses, check_rank,
                                 check_same_shape, check_token_ids)
from rlhf_jax.ops.chunked_head import chunked_head_stats
from rlhf_jax.ops.kept_set import kept_set_logits
from rlhf_jax.ops.logprobs import entropy_from_logits, token_logprobs


@struct.dataclass
class LMBatch:
    """Prompts `[B, P]` (left-padded) and N responses per prompt `[B, N, R]` (right-padded)."""

    prompt_ids: Any  # [B, P] int
    prompt_mask: Any  # [B, P] 1 = real prompt token
    response_ids: Any  # [B, N, R] int
    response_mask: Any  # [B, N, R] 1 = real, counted response token

    @property
    def batch_size(self) -> int:
        return jnp.shape(self.prompt_ids)[0]

    @property
    def num_responses(self) -> int:
        return jnp.shape(self.response_ids)[1]

    def validate(self) -> None:
        """Raise ValueError unless the arrays have the layout above: shapes and dtypes, and for
        concrete arrays also the values (real ids >= 0, left-padded prompts, no response
        tokens after an empty prompt)."""
        check_rank(self.prompt_ids, 2, "prompt_ids")
        check_rank(self.response_ids, 3, "response_ids")
        check_same_shape(prompt_ids=self.prompt_ids, prompt_mask=self.prompt_mask)
        check_same_shape(response_ids=self.response_ids, response_mask=self.response_mask)
        for name in ("prompt_ids", "response_ids"):
            dtype = jnp.result_type(getattr(self, name))
            if not jnp.issubdtype(dtype, jnp.integer):
                raise ValueError(f"`{name}` must hold integer token ids, got dtype {dtype}")
        if jnp.shape(self.response_ids)[0] != self.batch_size:
            raise ValueError(f"`response_ids` must have {self.batch_size} rows like `prompt_ids`, "
                             f"got shape {jnp.shape(self.response_ids)}")
        # Concrete arrays only: real ids must be >= 0; padded ones are never read (may be -100);
        # prompts are left-padded, and a row without prompt tokens (batch padding) has no response.
        check_token_ids(self.prompt_ids, self.prompt_mask, "prompt_ids")
        check_token_ids(self.response_ids, self.response_mask, "response_ids")
        check_left_padded(self.prompt_mask, "prompt_mask")
        check_prompted_responses(self.prompt_mask, self.response_mask)

    def joined(self):
        """`(input_ids, attention_mask)` `[B * N, P + R]`: each response after its own copy of
        the prompt (left padding before the prompt, right padding after the response)."""
        batch, num, length = jnp.shape(self.response_ids)
        repeat = lambda x: jnp.repeat(x, num, axis=0)
        flat = lambda x: x.reshape(batch * num, length)
        ids = jnp.concatenate([repeat(self.prompt_ids), flat(self.response_ids)], axis=1)
        mask = jnp.concatenate([repeat(self.prompt_mask), flat(self.response_mask)], axis=1)
        return ids, mask.astype(jnp.int32)


class ResponseHidden(NamedTuple):
    """Final hidden states of the responses (compute dtype)."""

    predicting: jax.Array  # [B, N, R, D]: the state that predicts response token j
    tokens: jax.Array  # [B, N, R, D]: the state at response token j itself


class ResponseLogprobs(NamedTuple):
    """Per-token log-probs of the responses under `softmax(logits / T)`."""

    logprobs: jax.Array  # [B, N, R] float32, 0 on padding
    mask: jax.Array  # [B, N, R] float32 copy of `response_mask`
    entropy: jax.Array | None = None  # [B, N, R] float32 (0 on padding), when asked for
    # with_vocab_stats (label-smoothed cross-entropy and accuracy, e.g. SFT):
    mean_logprob: jax.Array | None = None  # [B, N, R] mean_v log p(v) (0 on padding)
    is_argmax: jax.Array | None = None  # [B, N, R] 1.0 where the token is the argmax (no gradient)
    # [B, N, R] log-probs under the unfiltered softmax(logits / T): `logprobs` itself without
    # kept_threshold; with it, the full softmax's (the KL's), while `logprobs` are the kept set's
    full_logprobs: jax.Array | None = None

    def sequence_sum(self) -> jax.Array:
        """`sum_j logprobs[b, n, j]` [B, N]."""
        return jnp.sum(self.logprobs, axis=-1)

    def lengths(self) -> jax.Array:
        """Counted tokens per response [B, N] float32."""
        return jnp.sum(self.mask, axis=-1)


def response_hidden_states(apply_fn, params, batch: LMBatch, *, prompt_once: bool = True) -> ResponseHidden:
    """The hidden states that predict each response token and those at each response token.

    `apply_fn` is the `apply` of a `CausalLM`, `ValueModel` or `RewardModel` (any module with
    `hidden_states` and `shared_prefix_hidden_states`); `params` its parameter tree.
    """
    LMBatch.validate(batch)  # the layout only (a subclass's own checks are its step's job)
    variables = {"params": params}
    num, length = jnp.shape(batch.response_ids)[1:]
    if prompt_once and num > 1:
        last, tokens = apply_fn(variables, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                jnp.asarray(batch.response_mask, jnp.int32),
                                method="shared_prefix_hidden_states")  # [B, D], [B, N, R, D]
    else:
        ids, mask = batch.joined()
        prompt_length = jnp.shape(batch.prompt_ids)[1]
        # the prompt's last token and the responses: the last layer skips the other prompt rows
        rows = jnp.broadcast_to(jnp.arange(prompt_length - 1, prompt_length + length, dtype=jnp.int32),
                                (ids.shape[0], length + 1))
        hidden = apply_fn(variables, ids, mask, method="hidden_states", output_positions=rows)  # [B*N, 1+R, D]
        last = hidden[::num, 0]  # [B, D]: the prompt's last token
        tokens = hidden[:, 1:].reshape(batch.batch_size, num, length, -1)
    last = jnp.broadcast_to(last[:, None, None, :], (*tokens.shape[:2], 1, tokens.shape[-1]))
    predicting = jnp.concatenate([last.astype(tokens.dtype), tokens[:, :, :-1]], axis=2)
    return ResponseHidden(predicting, tokens)


def response_logprobs(apply_fn, params, batch: LMBatch, *, temperature=1.0, with_entropy: bool = False,
                      prompt_once: bool = True, head_chunk_size: int | str | None = "auto",
                      with_vocab_stats: bool = False, kept_threshold=None) -> ResponseLogprobs:
    """Log-probs `[B, N, R]` of every response token (see the module docstring).

    Args:
      apply_fn: `CausalLM.apply`.
      params: its parameter tree.
      batch: an `LMBatch`.
      temperature: `T > 0`; the logits are divided by it (rollout scoring and updates use the
        sampling temperature).
      with_entropy: also return the entropy of `softmax(logits / T)` at each response position.
      prompt_once: run each prompt once for its N responses (see the module docstring).
      head_chunk_size: `"auto"` (default: blocks of `default_chunk_size(V)` positions), an int
        (positions per block) or None (full `[B, N, R, V]` logits); see the module docstring.
      with_vocab_stats: also return `mean_logprob` and `is_argmax` (label smoothing, accuracy).
      kept_threshold: optional `[B, N, R]` kept-set thresholds of top-k / top-p sampling (units of
        `logits / T`; `rlhf_jax.ops.kept_set`): log-probs and entropy are then those of the kept
        set renormalised, `z_y - logsumexp_{z_v >= min(t, z_y)} z_v`, on either head (blocks:
        `chunked_head_stats(kept_threshold=)`; full logits: `kept_set_logits`). `mean_logprob`
        is then `mean_v z_v` minus the kept set's logsumexp; `is_argmax` is unchanged (the
        argmax is always kept). Ignored on padding. `full_logprobs` are always those of the
        unfiltered `softmax(logits / T)` (with gradients).
    """
    check_positive(temperature, "temperature")
    if head_chunk_size is not None and head_chunk_size != "auto" and (
            not isinstance(head_chunk_size, int) or head_chunk_size <= 0):
        raise ValueError(f"`head_chunk_size` must be 'auto', a positive int or None, got {head_chunk_size!r}")
    hidden = response_hidden_states(apply_fn, params, batch, prompt_once=prompt_once)
    mask = jnp.asarray(batch.response_mask, jnp.float32)
    counted = mask != 0
    tokens = jnp.where(counted, batch.response_ids, 0)
    keep = lambda x: jnp.where(counted, x, 0.0)
    if kept_threshold is not None:
        check_same_shape(response_ids=batch.response_ids, kept_threshold=kept_threshold)
        kept_threshold = jnp.where(counted, jnp.asarray(kept_threshold, jnp.float32), -jnp.inf)
    if head_chunk_size is None:
        logits = apply_fn({"params": params}, hidden.predicting, method="lm_logits")  # [B, N, R, V]
        scored = logits if kept_threshold is None else kept_set_logits(logits, tokens, kept_threshold,
                                                                        temperature=temperature)
        logprobs = keep(token_logprobs(scored, tokens, temperature=temperature))
        full_logprobs = logprobs if kept_threshold is None else keep(token_logprobs(logits, tokens,
                                                                                    temperature=temperature))
        entropy = keep(entropy_from_logits(scored, temperature=temperature)) if with_entropy else None
        mean_logprob = is_argmax = None
        if with_vocab_stats:
            scale = lambda x: x / jnp.asarray(temperature, jnp.float32)
            mean_logprob = keep(jnp.mean(scale(logits), -1) - jax.nn.logsumexp(scale(scored), -1))
            is_argmax = keep((jnp.argmax(logits, -1) == tokens).astype(jnp.float32))
        return ResponseLogprobs(logprobs, mask, entropy, mean_logprob, is_argmax, full_logprobs)
    head = apply_fn({"params": params}, method="output_head")
    if head_chunk_size == "auto" and tokens.size <= head.hidden_size:
        return response_logprobs(apply_fn, params, batch, temperature=temperature, with_entropy=with_entropy,
                                 prompt_once=prompt_once, head_chunk_size=None, with_vocab_stats=with_vocab_stats,
                                 kept_threshold=kept_threshold)
    chunk = None if head_chunk_size == "auto" else head_chunk_size
    stats = chunked_head_stats(hidden.predicting, head, tokens, temperature=temperature, chunk_size=chunk,
                               kept_threshold=kept_threshold)
    logprobs = keep(stats.logprobs)
    return ResponseLogprobs(
        logprobs, mask,
        keep(stats.entropy) if with_entropy else None,
        keep(stats.mean_logprob) if with_vocab_stats else None,
        keep(jax.lax.stop_gradient(stats.is_argmax)) if with_vocab_stats else None,
        logprobs if kept_threshold is None else keep(stats.full_logprobs),
    )


def response_states_at(apply_fn, params, batch: LMBatch, index, *, prompt_once: bool = True) -> jax.Array:
    """`[B, N, D]`: the final hidden state of each response at its token `index[b, n]`
    (`index` [B, N] int in [-1, R); -1 = the prompt's last token).

    The same states as `response_hidden_states(...).tokens` read at `index`, for one position
    per response: the model's last layer runs its queries and MLP at that position only (see
    `rlhf_jax.models.transformer.Decoder`), e.g. where a reward model reads its score.
    """
    LMBatch.validate(batch)
    variables = {"params": params}
    num, length = jnp.shape(batch.response_ids)[1:]
    index = jnp.asarray(index, jnp.int32)
    if prompt_once and num > 1:
        last, tokens = apply_fn(variables, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                jnp.asarray(batch.response_mask, jnp.int32), jnp.maximum(index, 0)[..., None],
                                method="shared_prefix_hidden_states")  # [B, D], [B, N, 1, D]
        return jnp.where((index < 0)[..., None], last[:, None].astype(tokens.dtype), tokens[:, :, 0])
    ids, mask = batch.joined()
    prompt_length = jnp.shape(batch.prompt_ids)[1]
    rows = (prompt_length + index).reshape(-1, 1)  # [B*N, 1]: -1 reads the prompt's last token
    hidden = apply_fn(variables, ids, mask, method="hidden_states", output_positions=rows)  # [B*N, 1, D]
    return hidden.reshape(batch.batch_size, num, -1)


def response_end_states(hidden: ResponseHidden, response_mask) -> jax.Array:
    """`[B, N, D]`: each response's state at its last real token (the prompt's last token for
    an empty response), where a reward model reads its score."""
    lengths = jnp.sum(jnp.asarray(response_mask, jnp.int32), axis=-1)  # [B, N]
    ends = jnp.concatenate([hidden.predicting[:, :, :1], hidden.tokens], axis=2)  # [B, N, R + 1, D]
    return jnp.take_along_axis(ends, lengths[:, :, None, None], axis=2)[:, :, 0]


__all__ = ["LMBatch", "ResponseHidden", "ResponseLogprobs", "response_hidden_states", "response_logprobs",
           "response_end_states", "response_states_at"]
