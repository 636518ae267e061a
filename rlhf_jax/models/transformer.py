"""The decoder-only transformer (`Decoder`) and the causal language model (`CausalLM`).

One module serves every family of `ModelConfig` (GPT-2, Llama, Qwen2, Qwen3, Mistral,
Gemma 2, Gemma 3 text); the config's flags switch the pieces that differ:

    embeddings        tokens (+ learned positions, GPT-2) (* sqrt(D) in the compute dtype, Gemma)
    block             x + attn(norm(x)); x + mlp(norm(x))   -- pre-norm (GPT-2, Llama, Qwen, Mistral)
                      x + norm(attn(norm(x))); x + norm(mlp(norm(x)))   -- sandwich_norms (Gemma)
    attention         q/k per-head RMSNorm (Qwen3, Gemma 3), RoPE, 1/sqrt(query_pre_attn_scalar)
                      scale and score soft-capping (Gemma 2), full or sliding-window span
    per-layer type    `config.layer_types[i]`: "full_attention" or "sliding_attention"; the
                      decoder builds one mask per type used and each layer takes its type's
                      mask and RoPE (Gemma 3: a separate RoPE base on sliding layers)
    head              final norm, LM head (tied or not), final-logit soft-capping (Gemma)

Forward API (the training code calls these; params come from `load_pretrained` or `init`):

    model = CausalLM(config)
    logits = model.apply({"params": params}, input_ids, attention_mask)
        # input_ids [B, T] int, attention_mask [B, T] (1 = real token, 0 = pad; None = all 1)
        # ids where the mask is 0 are ignored (any value, e.g. -100); real ids must be in [0, V)
        # -> logits [B, T, V] float32
        # `__call__` returns logits only, whatever its arguments
    logits, new_cache = model.apply({"params": params}, input_ids, attention_mask, cache=cache,
                                    method="forward_with_cache")
    hidden = model.apply({"params": params}, input_ids, attention_mask, method="hidden_states")
        # hidden [B, T, D]: final-norm hidden states in the compute dtype
        # output_positions=rows [B, M] int -> [B, M, D]: the last layer runs its queries and
        # MLP only there (keys and values for every token)
    logits = model.apply({"params": params}, hidden, method="lm_logits")
        # any [..., D] hidden -> [..., V] float32; project only the positions a loss reads
    head = model.apply({"params": params}, method="output_head")
        # ops.chunked_head.OutputHead: the vocabulary kernel in the compute dtype, its layout
        # and the final-logit soft-cap, for `chunked_head_stats` (log-probs without [.., V] logits)
    last, hidden = model.apply({"params": params}, prompt_ids, prompt_mask, response_ids,
                               response_mask, method="shared_prefix_hidden_states")
        # N continuations [B, N, R] of left-padded prompts [B, P], each prompt run once

Position ids default to `clip(cumsum(attention_mask) - 1, 0)` (any padding side; with a
cache they continue from the real tokens already cached) and can be passed as
`position_ids=` [B, T]. Caches come from `rlhf_jax.models.kv_cache.init_cache`.

Parameter tree (`params`):
    decoder/embed/embedding [V, D]; decoder/position_embed/embedding [P, D] (GPT-2 only)
    decoder/layers_{i}/{attn_norm, mlp_norm}/{scale, bias?}
    decoder/layers_{i}/{post_attn_norm, post_mlp_norm}/scale (sandwich_norms only)
    decoder/layers_{i}/attn/{q_proj, k_proj, v_proj | qkv_proj, o_proj}/{kernel [in, out], bias?}
    decoder/layers_{i}/attn/{q_norm, k_norm}/scale [Dh] (qk_norm only)
    decoder/layers_{i}/mlp/{gate_proj, up_proj, down_proj | fc_in, fc_out}/{kernel, bias?}
    decoder/final_norm/{scale, bias?}; lm_head/kernel [D, V] (untied embeddings only)
Gemma's RMSNorm scales are stored as in its checkpoints (`scale - 1`, see `RMSNorm`).
There is no dropout (RLHF fine-tuning runs with dropout off).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from rlhf_jax.models.kv_cache import (
    append_slots, causal_mask, init_cache, positions_from_mask, sliding_window_mask, window_attend_mask,
    write_cache_mask, write_cache_positions, write_window,
)
from rlhf_jax.models.layers import INIT_STD, MLP, Attention, fold_matmul, make_norm, soft_cap, take_rows
from rlhf_jax.ops.checks import check_left_padded, check_rank, check_same_shape, check_token_ids
from rlhf_jax.ops.chunked_head import OutputHead


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    With `sandwich_norms` (Gemma 2/3) each branch output is normed again before the add:
    `x + norm(attn(norm(x)))`, `x + norm(mlp(norm(x)))`. `layer_type` selects the
    attention's RoPE; its span comes with `attend_mask`.
    """

    config: ModelConfig
    layer_type: str = FULL_ATTENTION

    @nn.compact
    def __call__(self, x, positions, attend_mask, layer_cache=None, cache_index=None, query_rows=None):
        """x [B, T, D] -> ([B, T, D], layer cache); with `query_rows` [B, M] only those M rows
        are computed past the keys and values ([B, M, D] out, see `Attention`)."""
        c = self.config
        attn_out, new_layer_cache = Attention(c, self.layer_type, name="attn")(
            make_norm(c, "attn_norm")(x), positions, attend_mask, layer_cache, cache_index, query_rows
        )
        if c.sandwich_norms:
            attn_out = make_norm(c, "post_attn_norm")(attn_out)
        if query_rows is not None:
            x = take_rows(x, query_rows)
        x = x + attn_out
        mlp_out = MLP(c, name="mlp")(make_norm(c, "mlp_norm")(x))
        if c.sandwich_norms:
            mlp_out = make_norm(c, "post_mlp_norm")(mlp_out)
        return x + mlp_out, new_layer_cache


class Decoder(nn.Module):
    """Token (+ learned position) embeddings, `num_layers` blocks and the final norm."""

    config: ModelConfig

    def setup(self):
        c = self.config
        embed_kwargs = dict(
            dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=nn.initializers.normal(INIT_STD),
        )
        self.embed = nn.Embed(c.vocab_size, c.hidden_size, **embed_kwargs)
        if c.position_embedding == "learned":
            self.position_embed = nn.Embed(c.max_position_embeddings, c.hidden_size, **embed_kwargs)
        block = nn.remat(Block) if c.remat else Block
        self.layers = [block(c, c.layer_type(i)) for i in range(c.num_layers)]
        self.final_norm = make_norm(c, "final_norm")

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, output_positions=None,
                 append=False):
        """Final hidden states [B, T, D] and the updated cache (None without a cache).

        `append=True` (with a full cache, `index` = its S slots): the T tokens continue the
        cached ones as a training pass does (nothing is written: the returned cache is None),
        where the default writes them into the cache's free slots. The cache's `mask` and
        `positions` have the B input rows; its layers may hold B / N rows, each continued by
        N consecutive input rows (a prompt shared by N responses, `shared_prefix_forward`),
        whose keys and values attention reads without copying them (`ops.prefix_attention`, or
        `ops.blockwise_prefix_attention` on the blockwise path).

        `output_positions` [B, M] int: return the final hidden states of those positions only,
        [B, M, D]. The last layer then computes keys and values for every token (the cache
        gets them all) but its queries, attention output, MLP and the final norm only at the
        M positions: for a 4-layer model read at one position per row that skips ~20% of
        the forward pass (and of its gradient). Same numbers as slicing the full output.
        """
        check_rank(input_ids, 2, "input_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        check_same_shape(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        c = self.config
        if cache is None:
            attend_mask = causal_mask(attention_mask)  # [B, T, T]
            positions = positions_from_mask(attention_mask) if position_ids is None else position_ids
            key_positions = positions
        else:
            if append:
                cache = append_slots(cache, input_ids.shape[1])  # [B, S + T] mask and positions
            cache_mask, attend_mask, positions = write_cache_mask(cache, attention_mask)  # [B, T, S]
            positions = positions if position_ids is None else position_ids
            key_positions = write_cache_positions(cache, positions)  # [B, S]
        # One mask per attention span in use; each layer reads its own type's.
        masks = {FULL_ATTENTION: attend_mask}
        windowed = cache is not None and not append and "window" in cache  # ring slots (kv_cache)
        if windowed:  # over the ring slots (and the new tokens when T > 1)
            window = write_window(cache["window"], attention_mask, positions, cache["index"])
            masks[SLIDING_ATTENTION] = window_attend_mask(cache["window"], window, attention_mask, positions,
                                                          c.sliding_window)
        elif c.layer_types is not None and SLIDING_ATTENTION in c.layer_types:
            masks[SLIDING_ATTENTION] = sliding_window_mask(
                attend_mask, positions, key_positions, c.sliding_window
            )

        # Ids at padded positions are never looked up: any value may stand there (e.g. an
        # ignore index of -100), where an out-of-range id would embed as NaN and reach the
        # real tokens through attention (0 weight x NaN value).
        check_token_ids(input_ids, attention_mask, "input_ids", c.vocab_size)
        x = self.embed(jnp.where(attention_mask != 0, input_ids, 0))  # [B, T, D]
        if c.scale_embeddings:  # in the compute dtype, as Gemma's checkpoints expect
            x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        if c.position_embedding == "learned":
            x = x + self.position_embed(positions)
        if output_positions is not None:
            check_rank(output_positions, 2, "output_positions")
        new_layers = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache["layers"][i]
            index = None if cache is None or append else cache["index"]
            rows = output_positions if i == last else None
            x, new_layer_cache = layer(x, positions, masks[c.layer_type(i)], layer_cache, index, rows)
            new_layers.append(new_layer_cache)
        hidden = self.final_norm(x)
        if cache is None or append:
            return hidden, None
        new_cache = {
            "index": cache["index"] + input_ids.shape[1],
            "mask": cache_mask,
            "positions": key_positions,
            "layers": tuple(new_layers),
        }
        if windowed:
            new_cache["window"] = window
        return hidden, new_cache

    def attend(self, hidden):
        """Logits from tied embeddings: `hidden @ embedding.T`, accumulated in float32."""
        embedding = self.embed.embedding.astype(jnp.dtype(self.config.dtype))
        return fold_matmul(hidden.astype(embedding.dtype), embedding, transpose_kernel=True,
                           accumulate=jnp.float32)


class LMHead(nn.Module):
    """Untied output projection: `hidden @ kernel` [D, V], accumulated in float32."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.kernel = self.param(
            "kernel", nn.initializers.normal(INIT_STD), (c.hidden_size, c.vocab_size),
            jnp.dtype(c.param_dtype),
        )

    def __call__(self, hidden):
        kernel = self.kernel.astype(jnp.dtype(self.config.dtype))
        return fold_matmul(hidden.astype(kernel.dtype), kernel, accumulate=jnp.float32)


def shared_prefix_forward(decoder: Decoder, config: ModelConfig, prompt_ids, prompt_mask, response_ids,
                          response_mask, response_positions=None):
    """Final hidden states of N continuations per prompt, with each prompt run once.

    prompt_ids / prompt_mask [B, P]: left-padded prompts (each row's last column real).
    response_ids / response_mask [B, N, R]: right-padded continuations of each prompt.
    response_positions [B, N, M] int (optional): return the continuations' states at these
    positions only (e.g. each one's last token), skipping the rest of the last layer's work.
    Returns `(prompt_last [B, D], responses [B, N, R or M, D])`: the final hidden states at
    each prompt's last token and at every (or each requested) continuation token, the same
    as a forward pass over each prompt + continuation. The prompt's keys and values are
    computed once, in a cache of P slots, and the N continuations attend to them without a
    copy (`ops.prefix_attention`: one product per head for all N continuations' queries, the
    prompt's key and value gradients summed inside it; on the blockwise path
    `ops.blockwise_prefix_attention` merges the prompt and continuation parts by their
    log-sum-exp), so the prompt costs one forward pass
    instead of N; the prompt pass computes its last layer past the keys and values only at
    the prompt's last token.
    """
    check_rank(prompt_ids, 2, "prompt_ids")
    check_rank(response_ids, 3, "response_ids")
    check_same_shape(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    check_same_shape(response_ids=response_ids, response_mask=response_mask)
    check_left_padded(prompt_mask, "prompt_mask")
    batch, prompt_len = prompt_ids.shape
    num, response_len = response_ids.shape[1:]
    if response_ids.shape[0] != batch:
        raise ValueError(f"`response_ids` must have {batch} rows like `prompt_ids`, got {response_ids.shape}")
    cache = init_cache(config, batch, prompt_len)
    prompt_last = jnp.full((batch, 1), prompt_len - 1, jnp.int32)
    prompt_hidden, cache = decoder(prompt_ids, prompt_mask, None, cache, prompt_last)  # [B, 1, D]
    # The N continuations of a row share its cached keys and values; only the bookkeeping
    # (which slots are real, their positions) is per continuation row.
    cache = {**cache, "mask": jnp.repeat(cache["mask"], num, axis=0),
             "positions": jnp.repeat(cache["positions"], num, axis=0)}
    flat = lambda x: x.reshape(batch * num, x.shape[-1])
    rows = None if response_positions is None else flat(jnp.asarray(response_positions, jnp.int32))
    hidden, _ = decoder(flat(response_ids), flat(response_mask), None, cache, rows, append=True)
    return prompt_hidden[:, 0], hidden.reshape(batch, num, hidden.shape[1], -1)


class CausalLM(nn.Module):
    """Decoder + language-model head; see the module docstring for the call conventions."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.decoder = Decoder(c)
        if not c.tie_word_embeddings:
            self.lm_head = LMHead(c)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        """Logits [B, T, V] in float32 (hidden states: `hidden_states`; a KV cache:
        `forward_with_cache`)."""
        hidden, _ = self.decoder(input_ids, attention_mask, position_ids, None)
        return self.lm_logits(hidden)

    def forward_with_cache(self, input_ids, attention_mask=None, position_ids=None, *, cache):
        """`(logits [B, T, V], new_cache)`: the forward pass continuing from `cache` (from
        `rlhf_jax.models.kv_cache.init_cache`), the T new tokens written into it."""
        hidden, new_cache = self.decoder(input_ids, attention_mask, position_ids, cache)
        return self.lm_logits(hidden), new_cache

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, output_positions=None):
        """Final hidden states [B, T, D] (`[B, M, D]` at `output_positions` [B, M], see
        `Decoder`); `(hidden, new_cache)` when a cache is given."""
        hidden, new_cache = self.decoder(input_ids, attention_mask, position_ids, cache, output_positions)
        return hidden if cache is None else (hidden, new_cache)

    def shared_prefix_hidden_states(self, prompt_ids, prompt_mask, response_ids, response_mask,
                                    response_positions=None):
        """Hidden states of N continuations per prompt, each prompt run once (see
        `shared_prefix_forward`): `(prompt_last [B, D], responses [B, N, R, D])`."""
        return shared_prefix_forward(self.decoder, self.config, prompt_ids, prompt_mask,
                                     response_ids, response_mask, response_positions)

    def lm_logits(self, hidden):
        """Vocabulary logits [..., V] in float32 from hidden states [..., D] (soft-capped to
        `cap * tanh(logits / cap)` when the config has a `final_logit_softcap`)."""
        if self.config.tie_word_embeddings:
            logits = self.decoder.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return soft_cap(logits, self.config.final_logit_softcap)

    def output_head(self) -> OutputHead:
        """The vocabulary projection as an `OutputHead` (kernel cast to the compute dtype:
        the tied `[V, D]` embedding or the `[D, V]` `lm_head` kernel, plus the soft-cap), so
        that `ops.chunked_head.chunked_head_stats` can score tokens block by block with
        the same numbers as `lm_logits` and gradients flowing to the parameters."""
        c = self.config
        if c.tie_word_embeddings:
            kernel, vocab_major = self.decoder.embed.embedding, True
        else:
            kernel, vocab_major = self.lm_head.kernel, False
        return OutputHead(kernel.astype(jnp.dtype(c.dtype)), vocab_major, c.final_logit_softcap)
