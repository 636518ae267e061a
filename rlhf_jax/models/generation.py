"""Autoregressive sampling with a KV cache, compiled as one program.

    out = jitted_generate(module, params, prompt_ids, prompt_mask, rng, max_new_tokens=64,
                          temperature=1.0, eos_token_id=2, pad_token_id=0)
    out.tokens, out.mask, out.logprobs, out.finished   # [B, N], [B, N], [B, N], [B]

`jitted_generate` is `jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)` that also
takes token ids as lists or NumPy ints (a Hugging Face `generation_config.eos_token_id` is often
a list, which `jax.jit` cannot hash as a static argument) and checks concrete prompt masks
before tracing. Under your own `jax.jit`, pass `eos_token_id` as an int or a tuple.

The prompt batch is LEFT-padded (the last column holds every row's last prompt token; rows of
only padding are allowed). A mask that is not, e.g. from a Hugging Face tokenizer's default
`padding_side="right"`, is a ValueError when its values can be read (outside `jax.jit`; or
`jitted_generate`, before tracing). One prefill pass fills the cache and yields the first
token's logits (projected to the vocabulary at the last position only); then a `lax.while_loop` feeds one token per step
through the cache until `max_new_tokens` tokens exist or every row has produced an EOS.
Everything stays on device: no host round trip per token. The loop state is small (step,
last token, next position, cache, finished flags, output buffers), and the random numbers
of all steps (one uniform per row and step) are drawn before the loop.

`num_samples=G` samples G continuations of every prompt: the prefill runs once per prompt
and its cache is copied to the G rows of the group (rows `b*G .. b*G + G - 1` continue prompt
b), which saves `(G - 1) / G` of the prefill; the output has `B * G` rows and equals
`generate` on the prompts repeated G times (same random numbers, same tokens). `kept_set=True`
also returns, per token, the kept set of top-k / top-p sampling (`sampling.select_kept_set`):
its threshold and the token's log-prob renormalised over it, so a trainer can score tokens
under the distribution they were drawn from.
"""
from __future__ import annotations

import numbers
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.models.kv_cache import init_cache
from rlhf_jax.models.sampling import open_uniforms, select_kept_set, select_tokens, validate_sampling_options
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.ops.checks import check_left_padded, check_rank, check_same_shape

# Arguments that shape the compiled program; `temperature` may be static or traced. Static
# arguments must be hashable: token ids as ints or tuples (`jitted_generate` converts lists).
GENERATE_STATIC_ARGNAMES = (
    "module", "max_new_tokens", "top_k", "top_p", "greedy", "eos_token_id", "pad_token_id",
    "num_samples", "kept_set",
)


class GenerationOutput(NamedTuple):
    """Sampled continuations of a prompt batch (a pytree)."""

    tokens: jax.Array  # [B, N] int32; pad_token_id after the first EOS
    mask: jax.Array  # [B, N] int32; 1 up to and including the first EOS, 0 after
    logprobs: jax.Array  # [B, N] float32; log_softmax(logits / T) of each token, 0 where mask is 0
    finished: jax.Array  # [B] bool; the row produced an EOS
    # With `kept_set=True` (else None), 0 where mask is 0:
    kept_logprobs: jax.Array | None = None  # [B, N] log-prob renormalised over the kept set
    kept_threshold: jax.Array | None = None  # [B, N] smallest kept logit / T


def _is_token_id(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _eos_ids(eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return ()
    if _is_token_id(eos_token_id):
        return (int(eos_token_id),)
    if (isinstance(eos_token_id, Sequence) and not isinstance(eos_token_id, str)
            and all(_is_token_id(i) for i in eos_token_id)):
        return tuple(int(i) for i in eos_token_id)
    raise ValueError(f"`eos_token_id` must be an int, a tuple (or list) of ints or None, got {eos_token_id!r}")


def _pad_id(pad_token_id) -> int:
    if not _is_token_id(pad_token_id):
        raise ValueError(f"`pad_token_id` must be a static int (e.g. the tokenizer's `pad_token_id`, or its "
                         f"`eos_token_id` when it has none), got {pad_token_id!r}")
    return int(pad_token_id)


def _is_eos(tokens, eos_ids: tuple[int, ...]):
    hit = jnp.zeros(tokens.shape, bool)
    for eos in eos_ids:
        hit = hit | (tokens == eos)
    return hit


def generate(module: CausalLM, params, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
             temperature=1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_token_id, pad_token_id: int, num_samples: int = 1,
             kept_set: bool = False) -> GenerationOutput:
    """Sample `max_new_tokens` tokens after each left-padded prompt.

    module, params: a `CausalLM` (or a `LoRAModel` of one) and its parameters. prompt_ids / prompt_mask [B, P]:
    left-padded prompts and their attention mask (1 = real token; every row's last column
    must be a real token, since the first new token is read there; rows of only padding are
    allowed); a concrete mask that is not left-padded raises a ValueError. rng: a PRNG key
    (unused when greedy). temperature: logits are divided by it before filtering and for the
    returned log-probs. top_k: keep the k most likely tokens (0 = off). top_p: nucleus
    mass (1 = off). greedy: argmax instead of sampling. eos_token_id: int, tuple of ints
    (any ends a row) or None (never stop); a list works here but not as a `jax.jit` static
    argument (`jitted_generate` converts it). pad_token_id: written after a row's EOS. Ids
    may be NumPy ints.
    num_samples: G continuations per prompt from one prefill (output rows `b*G + g`).
    kept_set: also return `kept_logprobs` and `kept_threshold` (module docstring).
    Returns a `GenerationOutput`; `jitted_generate` is its compiled form.
    """
    if not isinstance(getattr(module, "module", module), CausalLM):  # a CausalLM, or a LoRAModel of one
        raise ValueError(f"`module` must be a CausalLM, got {type(module).__name__}")
    check_rank(prompt_ids, 2, "prompt_ids")
    check_same_shape(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    check_left_padded(prompt_mask, "prompt_mask")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a static int >= 1, got {max_new_tokens!r}")
    pad_token_id = _pad_id(pad_token_id)
    validate_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a static int >= 1, got {num_samples!r}")
    eos_ids = _eos_ids(eos_token_id)
    config = module.config
    prompts, prompt_len = prompt_ids.shape
    batch = prompts * num_samples  # output rows
    total_len = prompt_len + max_new_tokens
    if config.position_embedding == "learned" and total_len > config.max_position_embeddings:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}"
        )
    variables = {"params": params}
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    select = partial(select_kept_set, **options) if kept_set else partial(select_tokens, **options)
    # Every random number the loop needs, drawn once: one uniform per row and step.
    uniforms = None if greedy else open_uniforms(rng, (max_new_tokens, batch))
    prompt_mask = prompt_mask.astype(jnp.int32)

    # Prefill: the whole prompt in one pass, vocabulary logits at the last position only.
    cache = init_cache(config, prompts, total_len, window_slots=True)  # sliding layers: W ring slots
    last = jnp.full((prompts, 1), prompt_len - 1, jnp.int32)  # the last layer's queries: here only
    hidden, cache = module.apply(
        variables, prompt_ids, prompt_mask, cache=cache, method="hidden_states", output_positions=last
    )
    logits = module.apply(variables, hidden[:, -1], method="lm_logits")  # [B, V] float32
    next_position = jnp.sum(prompt_mask, axis=1)  # [B]: position of the first new token
    if num_samples > 1:  # the G rows of a group continue from copies of its prompt's cache
        repeat = lambda x: jnp.repeat(x, num_samples, axis=0) if jnp.ndim(x) else x
        cache, logits, next_position = jax.tree.map(repeat, (cache, logits, next_position))

    def choose(step, logits, finished):
        row_uniforms = None if greedy else jax.lax.dynamic_index_in_dim(uniforms, step, keepdims=False)
        token, *values = select(logits, row_uniforms)  # values: logprobs (+ kept set)
        token = jnp.where(finished, pad_token_id, token)
        values = tuple(jnp.where(finished, 0.0, value) for value in values)
        return token, values, finished | _is_eos(token, eos_ids)

    def write(buffers, values, step):
        return tuple(jax.lax.dynamic_update_slice_in_dim(buffer, value[:, None], step, axis=1)
                     for buffer, value in zip(buffers, values))

    token, values, finished = choose(0, logits, jnp.zeros((batch,), bool))
    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    buffers = write(tuple(jnp.zeros((batch, max_new_tokens), jnp.float32) for _ in values), values, 0)
    new_token_mask = jnp.ones((batch, 1), jnp.int32)

    def keep_going(state):
        step, _, _, _, finished, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def decode_step(state):
        step, token, position, cache, finished, tokens, buffers = state
        logits, cache = module.apply(
            variables, token[:, None], new_token_mask, position_ids=position[:, None], cache=cache,
            method="forward_with_cache",
        )
        token, values, finished = choose(step, logits[:, 0], finished)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        return step + 1, token, position + 1, cache, finished, tokens, write(buffers, values, step)

    state = (jnp.int32(1), token, next_position, cache, finished, tokens, buffers)
    _, _, _, _, finished, tokens, buffers = jax.lax.while_loop(keep_going, decode_step, state)

    # A slot counts when no EOS precedes it (tokens after an EOS are pad, possibly == EOS).
    eos_hits = _is_eos(tokens, eos_ids).astype(jnp.int32)
    eos_before = jnp.cumsum(eos_hits, axis=1) - eos_hits
    mask = (eos_before == 0).astype(jnp.int32)
    kept = dict(kept_logprobs=buffers[1], kept_threshold=buffers[2]) if kept_set else {}
    return GenerationOutput(tokens=tokens, mask=mask, logprobs=buffers[0], finished=finished, **kept)


_compiled_generate = jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)


def jitted_generate(module: CausalLM, params, prompt_ids, prompt_mask, rng, *, eos_token_id, pad_token_id,
                    **options) -> GenerationOutput:
    """`generate` compiled with `jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)`,
    taking the same arguments; `eos_token_id` may be a list and ids NumPy ints (converted to
    hashable Python ints / tuples first), and a concrete `prompt_mask` is checked for left
    padding before tracing. One compilation per set of static arguments and shapes."""
    check_left_padded(prompt_mask, "prompt_mask")
    return _compiled_generate(module, params, prompt_ids, prompt_mask, rng, eos_token_id=_eos_ids(eos_token_id),
                              pad_token_id=_pad_id(pad_token_id), **options)
