"""Attention of N continuations to one shared prefix, without copying the prefix's keys and values.

Row b holds a prefix of S keys and values (K_b [Dh, S], V_b [S, Dh], e.g. a prompt in a KV
cache) continued by N sequences; continuation (b, n) brings U tokens of its own (k_bn, v_bn)
and queries q_bn [T, Dh] (already scaled). Every query attends jointly to the prefix and to
its own continuation:

    s_prefix = cap(q_bn K_b),   s_own = cap(q_bn k_bn),   cap(x) = c * tanh(x / c) (or x)
    masked entries of either take MIN (the most negative finite float32)
    out_bn = softmax([s_prefix, s_own]) [V_b; v_bn]

with one softmax over the S + U keys: the row maximum and normaliser span both parts. This is
the attention over each continuation's concatenated keys `[K_b, k_bn]`, i.e. over the prefix
repeated N times, to float32 rounding; a row that sees no key gets the uniform average of all
S + U values, as the plain path gives it. Here the N continuations' queries meet the prefix
in one product per key/value head, `[N * G * T, Dh] x [Dh, S]`, and the prefix's key and
value gradients add up over the N continuations inside that product: no `[B * N, ..., S]`
copy of the prefix exists in the forward or the backward pass. Measured (benchmarks/memory.py,
GRPO step on the Qwen3-0.6B shape, 1,024 tokens, 4 responses per prompt): XLA's temporaries
5.17 -> 4.84 GB against the copying layout; CPU time at the GRPO benchmark's shape is the same
within run-to-run noise.

Layouts (K key/value heads, G query heads per key/value head):
q [B, K, N, G, T, Dh], k [B, K, N, Dh, U], v [B, K, N, U, Dh], prefix_k [B, K, Dh, S],
prefix_v [B, K, S, Dh], mask [B, N, T, S + U] bool (True = may attend; the first S columns
are the prefix's slots). Scores and the softmax are float32, the products run in q's dtype
with float32 accumulation, the output has v's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.chunked_head import soft_cap

MIN = float(jnp.finfo(jnp.float32).min)
F32 = jnp.float32


def check_prefix_shapes(q, k, v, prefix_k, prefix_v, mask):
    """Raise ValueError naming the argument whose shape does not fit q's (layouts: module doc)."""
    batch, kv_heads, num, groups, time, head_dim = q.shape
    slots, own = prefix_k.shape[-1], k.shape[-1]
    expected = {
        "k": (batch, kv_heads, num, head_dim, own), "v": (batch, kv_heads, num, own, head_dim),
        "prefix_k": (batch, kv_heads, head_dim, slots), "prefix_v": (batch, kv_heads, slots, head_dim),
        "mask": (batch, num, time, slots + own),
    }
    for name, array in dict(k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, mask=mask).items():
        if array.shape != expected[name]:
            raise ValueError(f"`{name}` must have shape {expected[name]} for q {q.shape}, got {array.shape}")


def prefix_attention(q, k, v, prefix_k, prefix_v, mask, *, softcap: float | None = None):
    """Attention output [B, K, N, G, T, Dh] of N continuations per shared prefix (module doc)."""
    check_prefix_shapes(q, k, v, prefix_k, prefix_v, mask)
    batch, kv_heads, num, groups, time, head_dim = q.shape
    slots, own = prefix_k.shape[-1], k.shape[-1]
    dtype = q.dtype
    # One array of queries [B, K, N, G * T, Dh] feeds both products (two layouts of it would
    # be two copies, each recomputing whatever XLA fuses into it).
    rows = q.reshape(batch, kv_heads, num, groups * time, head_dim)
    scores_prefix = jnp.einsum("bknqd,bkds->bknqs", rows, prefix_k.astype(dtype), preferred_element_type=F32)
    scores_prefix = scores_prefix.reshape(batch, kv_heads, num, groups, time, slots)
    scores_own = jnp.einsum("bknqd,bkndu->bknqu", rows, k.astype(dtype), preferred_element_type=F32)
    scores_own = scores_own.reshape(batch, kv_heads, num, groups, time, own)
    mask = jnp.asarray(mask, bool)[:, None, :, None]  # [B, 1, N, 1, T, S + U]
    scores_prefix = jnp.where(mask[..., :slots], soft_cap(scores_prefix, softcap), MIN)
    scores_own = jnp.where(mask[..., slots:], soft_cap(scores_own, softcap), MIN)
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores_prefix, -1), jnp.max(scores_own, -1)))[..., None]
    weights_prefix, weights_own = jnp.exp(scores_prefix - top), jnp.exp(scores_own - top)
    total = jnp.sum(weights_prefix, -1, keepdims=True) + jnp.sum(weights_own, -1, keepdims=True)
    probs_prefix = (weights_prefix / total).astype(v.dtype).reshape(batch, kv_heads, num, groups * time, slots)
    probs_own = (weights_own / total).astype(v.dtype).reshape(batch, kv_heads, num, groups * time, own)
    out = (jnp.einsum("bknqs,bksd->bknqd", probs_prefix, prefix_v.astype(v.dtype))
           + jnp.einsum("bknqu,bknud->bknqd", probs_own, v))
    return out.reshape(q.shape)


__all__ = ["check_prefix_shapes", "prefix_attention"]
