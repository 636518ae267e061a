"""The key/value cache: a plain pytree that the forward pass takes and returns.

    cache = {
        "index":     int32 [],                    # slots already written (same for every row)
        "mask":      int32 [B, S],                # 1 where a written slot holds a real token
        "positions": int32 [B, S],                # position id of the token in each written slot
        "layers":    ({"key":   [B, K, Dh, S],    # one dict per layer, in the compute dtype;
                       "value": [B, K, S, Dh]}, ...), # K key/value heads, S slots, Dh head size
    }

A forward call with `cache=` writes its T new tokens at slots [index, index + T), records
their attention mask and position ids, and returns the cache with `index + T`. Queries
attend to written slots at or before their own slot whose mask is 1, so left-padded prompts
stay masked for the whole generation. On sliding-window layers a query at position p also
needs a key position q > p - W (`sliding_window_mask`): the window counts token positions,
not slots, so padding never shifts it. The caller keeps `index + T <= S` (XLA clamps out-of-range writes).
Keys are stored transposed ([..., Dh, S]) so that both attention matmuls of a decode step
are plain batched products; on CPU that is several times faster than q @ k^T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> dict:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (dtype: config.dtype)."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"`batch_size` and `max_length` must be > 0, got {batch_size}, {max_length}")
    dtype = jnp.dtype(dtype or config.dtype)
    heads, head_dim = config.kv_heads, config.dims_per_head
    layers = tuple(
        {
            "key": jnp.zeros((batch_size, heads, head_dim, max_length), dtype),  # transposed
            "value": jnp.zeros((batch_size, heads, max_length, head_dim), dtype),
        }
        for _ in range(config.num_layers)
    )
    return {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch_size, max_length), jnp.int32),
        "positions": jnp.zeros((batch_size, max_length), jnp.int32),
        "layers": layers,
    }


def append_slots(cache: dict, extra: int) -> dict:
    """`cache` with `extra` empty slots appended to its `mask` and `positions` (index and
    layers unchanged): the bookkeeping of a forward pass that appends its keys and values to
    a full cache (`Decoder(..., append=True)`) instead of writing them into free slots."""
    grow = lambda x: jnp.pad(x, [(0, 0), (0, extra)])
    return {**cache, "mask": grow(cache["mask"]), "positions": grow(cache["positions"])}


def positions_from_mask(attention_mask):
    """Position ids `clip(cumsum(mask) - 1, 0)` [B, T]: real tokens count 0, 1, 2, ... from
    the first non-pad token, whatever the padding side; pad slots get 0."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


def causal_mask(attention_mask):
    """[B, T, T] bool: query i may attend key j iff j <= i and key j is not padding."""
    time = attention_mask.shape[1]
    causal = jnp.tril(jnp.ones((time, time), dtype=bool))
    return causal[None] & attention_mask.astype(bool)[:, None, :]


def write_cache_mask(cache: dict, attention_mask):
    """Record the new tokens' mask [B, T] at the cache index.

    Returns (cache mask [B, S], attend mask [B, T, S], positions [B, T]) where positions
    continue from the number of real tokens already in the cache.
    """
    index = cache["index"]
    time = attention_mask.shape[1]
    mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask.astype(jnp.int32), (0, index))
    slots = jnp.arange(mask.shape[1])
    query_slots = index + jnp.arange(time)
    attend = (slots[None, :] <= query_slots[:, None])[None] & mask.astype(bool)[:, None, :]
    seen = jnp.sum(cache["mask"], axis=1)  # real tokens before this call, [B]
    positions = seen[:, None] + positions_from_mask(attention_mask)
    return mask, attend, positions


def write_cache_positions(cache: dict, positions):
    """The cache's key positions [B, S] with the new tokens' positions [B, T] at the index."""
    return jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, cache["index"]))


def sliding_window_mask(attend_mask, query_positions, key_positions, window: int):
    """`attend_mask` [B, T, S] narrowed to a window of `window` positions.

    Query at position p keeps key position q iff `p - q < window` (with the causal mask: the
    `window` positions p - window + 1 .. p), the convention of transformers' sliding-window
    masks. transformers counts slots instead of positions; the two agree whenever a row's real
    tokens are contiguous (left or right padding), and positions keep the window right when
    a row has padding between real tokens. query_positions [B, T], key_positions [B, S].
    """
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, T, S]
    return attend_mask & (distance < window)
