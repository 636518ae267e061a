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

Window slots (`init_cache(..., window_slots=True)`, what `generate` uses): a sliding-window
layer needs only the keys of the last W = `sliding_window` positions, so when W < S it keeps
W slots used as a ring ({"window_key": [B, K, Dh, W], "window_value": [B, K, W, Dh]}: the
token of slot s sits in ring slot s mod W) and the cache holds their bookkeeping,
"window": {"mask": [B, W], "positions": [B, W]}. A forward call writes the last min(T, W) of
its T new tokens into the ring (`ring_slots`); a decode step (T = 1) attends to the ring so
written, a longer call to the ring as it was followed by its T tokens (`window_attend_mask`). The cache of such a layer is W / S
of the full one (Gemma 3: five layers of six; Mistral: every layer), and a decode step reads
W + 1 keys instead of S. Only for passes that write (not `append`). The ring holds the last W
slots, so a row's real tokens must be contiguous there, as in generation (a left-padded
prompt, then one token per step): padding between real tokens would take ring slots and
shorten that row's window (transformers' sliding caches count slots the same way), where the
full layout keeps counting positions.
Keys are stored transposed ([..., Dh, S]) so that both attention matmuls of a decode step
are plain batched products; on CPU that is several times faster than q @ k^T.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import SLIDING_ATTENTION, ModelConfig


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None, *,
               window_slots: bool = False) -> dict:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (dtype: config.dtype);
    with `window_slots`, sliding-window layers keep `sliding_window` ring slots when that is
    fewer than `max_length` (module docstring)."""
    if batch_size <= 0 or max_length <= 0:
        raise ValueError(f"`batch_size` and `max_length` must be > 0, got {batch_size}, {max_length}")
    dtype = jnp.dtype(dtype or config.dtype)
    heads, head_dim = config.kv_heads, config.dims_per_head
    window = config.sliding_window
    ring = window_slots and window is not None and window < max_length

    def layer_cache(layer: int) -> dict:
        if ring and config.layer_type(layer) == SLIDING_ATTENTION:
            return {"window_key": jnp.zeros((batch_size, heads, head_dim, window), dtype),
                    "window_value": jnp.zeros((batch_size, heads, window, head_dim), dtype)}
        return {"key": jnp.zeros((batch_size, heads, head_dim, max_length), dtype),  # transposed
                "value": jnp.zeros((batch_size, heads, max_length, head_dim), dtype)}

    cache = {
        "index": jnp.zeros((), jnp.int32),
        "mask": jnp.zeros((batch_size, max_length), jnp.int32),
        "positions": jnp.zeros((batch_size, max_length), jnp.int32),
        "layers": tuple(layer_cache(layer) for layer in range(config.num_layers)),
    }
    if ring and any(config.layer_type(layer) == SLIDING_ATTENTION for layer in range(config.num_layers)):
        cache["window"] = {"mask": jnp.zeros((batch_size, window), jnp.int32),
                           "positions": jnp.zeros((batch_size, window), jnp.int32)}
    return cache


def ring_slots(index, time: int, slots: int):
    """`(where [n], first)`: the ring slots that the last n = min(T, W) of T tokens written
    from cache slot `index` take (slot s -> s mod W; n <= W, so no two collide), and the
    position `first = T - n` of the first of them among the T."""
    count = min(time, slots)
    first = time - count
    return (index + first + jnp.arange(count)) % slots, first


def window_attend_mask(window: dict, written: dict, attention_mask, positions, size: int):
    """What the T new tokens (mask [B, T], positions [B, T]) attend to on a sliding layer with
    ring slots, each key real and within `size` positions (`sliding_window_mask`):

    - T = 1 (a decode step), [B, 1, W]: the ring after the token is written (`written`); the
      slot it took held a key `size` positions back, outside the window anyway, and reading
      only the updated ring lets XLA update it in place;
    - T > 1, [B, T, W + T]: the ring before (`window`, every slot written earlier), then the
      T tokens causally (a later token of the T may overwrite a slot an earlier one needs).
    """
    slots, time = window["mask"].shape[1], attention_mask.shape[1]
    if time == 1:
        return sliding_window_mask(written["mask"].astype(bool)[:, None, :], positions, written["positions"], size)
    valid = jnp.concatenate([window["mask"], attention_mask.astype(jnp.int32)], axis=1).astype(bool)
    key_positions = jnp.concatenate([window["positions"], positions.astype(jnp.int32)], axis=1)
    order = jnp.concatenate([jnp.full((slots,), -1, jnp.int32), jnp.arange(time, dtype=jnp.int32)])
    causal = order[None, :] <= jnp.arange(time, dtype=jnp.int32)[:, None]  # [T, W + T]
    return sliding_window_mask(causal[None] & valid[:, None, :], positions, key_positions, size)


def write_window(window: dict, attention_mask, positions, index) -> dict:
    """`window` bookkeeping with the last min(T, W) new tokens' mask and positions written."""
    where, first = ring_slots(index, attention_mask.shape[1], window["mask"].shape[1])
    return {"mask": window["mask"].at[:, where].set(attention_mask[:, first:].astype(jnp.int32)),
            "positions": window["positions"].at[:, where].set(positions[:, first:].astype(jnp.int32))}


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
