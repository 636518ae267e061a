"""Inputs and oracles shared by the shared-prefix attention tests: N continuations attend to
one prefix's keys and values and then to their own; the oracles repeat the prefix N times."""
import jax
import jax.numpy as jnp
import numpy as np

MIN = np.finfo(np.float32).min
BATCH, KV_HEADS, NUM, GROUPS, HEAD_DIM = 2, 2, 3, 2, 8


def prefix_inputs(seed, *, prefix, own, own_lengths, window=None, queries=None, split_row=False):
    """Random q (at `queries` of the `own` continuation positions, default all), k, v, prefix
    keys/values [B, K, ...] and the mask [B, N, T, S + U] of a causal pass over prefixes
    left-padded by 0 and 4 slots and continuations right-padded to `own_lengths` real tokens
    (one per continuation), optionally windowed by real-token position. Row 1 continuation 2
    sees no key at all; with `split_row`, row 0 continuation 1's first query sees only the
    prefix and its second only its own keys."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    rows = np.arange(own) if queries is None else np.asarray(queries)
    q = normal(BATCH, KV_HEADS, NUM, GROUPS, len(rows), HEAD_DIM)
    k, v = normal(BATCH, KV_HEADS, NUM, HEAD_DIM, own), normal(BATCH, KV_HEADS, NUM, own, HEAD_DIM)
    prefix_k, prefix_v = normal(BATCH, KV_HEADS, HEAD_DIM, prefix), normal(BATCH, KV_HEADS, prefix, HEAD_DIM)
    prefix_real = np.ones((BATCH, prefix), bool)
    prefix_real[1, :4] = False
    own_real = np.arange(own)[None, :] < np.asarray(own_lengths)[:, None]  # [N, U]
    key_real = np.concatenate([np.broadcast_to(prefix_real[:, None], (BATCH, NUM, prefix)),
                               np.broadcast_to(own_real[None], (BATCH, NUM, own))], axis=-1)  # [B, N, S + U]
    causal = np.arange(prefix + own)[None, :] <= (prefix + rows)[:, None]  # [T, S + U]
    mask = causal[None, None] & key_real[:, :, None, :]
    if window is not None:  # positions count real tokens
        positions = np.cumsum(key_real, axis=-1) - 1
        mask &= positions[:, :, prefix + rows][..., None] - positions[:, :, None, :] < window
    mask[1, 2] = False
    if split_row:
        mask[0, 1, 0, prefix:] = False
        mask[0, 1, 1, :prefix] = False
        assert mask[0, 1, 0, :prefix].any() and mask[0, 1, 1, prefix:].any()
    return q, k, v, prefix_k, prefix_v, mask


def numpy_prefix_attention(q, k, v, prefix_k, prefix_v, mask, softcap):
    """float64 softmax(cap(q [K_b, k_bn]) masked to MIN) [V_b; v_bn] per continuation, over
    the prefix repeated N times."""
    f64 = lambda x: np.asarray(x, np.float64)
    num = q.shape[2]
    keys = np.concatenate([np.repeat(f64(prefix_k)[:, :, None], num, 2), f64(k)], axis=-1)
    values = np.concatenate([np.repeat(f64(prefix_v)[:, :, None], num, 2), f64(v)], axis=-2)
    scores = np.einsum("bkngtd,bknds->bkngts", f64(q), keys)
    if softcap is not None:
        scores = softcap * np.tanh(scores / softcap)
    scores = np.where(np.asarray(mask)[:, None, :, None], scores, MIN)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bkngts,bknsd->bkngtd", weights / weights.sum(-1, keepdims=True), values)


def repeated_prefix_attention(q, k, v, prefix_k, prefix_v, mask, softcap):
    """Plain jnp softmax attention over the prefix repeated N times, concatenated with each
    continuation's own keys (the copying layout whose gradients the tests compare against)."""
    num = q.shape[2]
    keys = jnp.concatenate([jnp.repeat(prefix_k[:, :, None], num, 2), k], axis=-1)
    values = jnp.concatenate([jnp.repeat(prefix_v[:, :, None], num, 2), v], axis=-2)
    scores = jnp.einsum("bkngtd,bknds->bkngts", q, keys)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, None, :, None], scores, MIN)
    return jnp.einsum("bkngts,bknsd->bkngtd", jax.nn.softmax(scores, -1), values)


def no_key_average(arrays):
    """[K, Dh]: what the queries of row 1 continuation 2 (which see no key) get, the average
    of all S + U values, as the plain softmax over MIN gives."""
    _, _, v, _, prefix_v, _ = arrays
    return np.concatenate([prefix_v[1], v[1, :, 2]], axis=1).mean(1)
