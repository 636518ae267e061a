"""Blockwise attention of N continuations to one shared prefix, without copying the prefix.

The attention of `ops.prefix_attention` (continuation (b, n) attends jointly to row b's prefix
of S keys and to its own U keys, with one softmax over the S + U keys; masked scores MIN),
computed as two blockwise attentions (`ops.blockwise_attention`, memory linear in the
lengths) merged exactly through their rows' log-sum-exps:

1. over the prefix: the N continuations' queries of row b folded into one query axis,
   q [B, K, G, N * T, Dh] against prefix_k [B, K, Dh, S], prefix_v [B, K, S, Dh] with the
   exact per-query mask [B, N * T, S] -> (o1, lse1);
2. over each continuation's own keys: q [B * N, K, G, T, Dh] against k [B * N, K, Dh, U],
   v [B * N, K, U, Dh], mask [B * N, T, U] -> (o2, lse2);
3. with lse_p = log sum_{j in part p} exp(s_ij) (masked s = MIN) and M = max(lse1, lse2):

       w_p = exp(lse_p - M),   out = (w1 o1 + w2 o2) / (w1 + w2),

   which is softmax over the S + U keys of the concatenation, since
   o_p = sum_{j in p} exp(s_ij - lse_p) v_j and sum_{all j} exp(s_ij) = exp(lse1) + exp(lse2)
   (the merge of partial softmax normalisers of Milakov & Gimelshein 2018, "Online normalizer
   calculation for softmax", arXiv:1805.02867, that the online softmax applies block by block).

Gradients flow through o_p and lse_p (`blockwise_attention_with_lse`: a cotangent g on lse
enters FlashAttention-2's backward pass as D_i - g_i). The prefix's key and value gradients add
up over the N continuations inside the first attention's backward pass, and its residuals are
the prefix itself: neither pass holds a `[B * N, ..., S]` copy of the prefix.

Edge cases, as in the plain softmax over the concatenated keys: a part whose keys a row does
not see at all has lse = MIN + log(count) = MIN in float32, so exp(MIN - M) = 0 when the other
part sees a key (exactly the weight MIN scores get in the plain softmax). A row that sees no
key in either part has lse1 = lse2 = MIN, which has lost the counts: there the weights are the
counts S and U themselves, giving the uniform average of all S + U values (each o_p is its
part's uniform average), as the plain path does. Soft-capping applies per score, before
masking, in both parts.

Layouts as `ops.prefix_attention` (K key/value heads, G query heads per key/value head):
q [B, K, N, G, T, Dh] (scaled), k [B, K, N, Dh, U], v [B, K, N, U, Dh], prefix_k [B, K, Dh, S],
prefix_v [B, K, S, Dh], mask [B, N, T, S + U] bool (the first S columns are the prefix's).
Output [B, K, N, G, T, Dh] in v's dtype; the merge runs in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops.blockwise_attention import blockwise_attention_with_lse
from rlhf_jax.ops.prefix_attention import check_prefix_shapes

F32 = jnp.float32


def blockwise_prefix_attention(q, k, v, prefix_k, prefix_v, mask, *, softcap: float | None = None,
                               block_q: int = 512, block_k: int = 512):
    """Attention output [B, K, N, G, T, Dh] of N continuations per shared prefix, blockwise
    (`block_q` x `block_k` queries x keys at a time) and without a per-continuation copy of the
    prefix (module doc). Same values and gradients as `ops.prefix_attention` to float32 rounding."""
    check_prefix_shapes(q, k, v, prefix_k, prefix_v, mask)
    batch, kv_heads, num, groups, time, head_dim = q.shape
    slots, own = prefix_k.shape[-1], k.shape[-1]
    mask = jnp.asarray(mask, bool)
    blocks = dict(softcap=softcap, block_q=block_q, block_k=block_k)

    # 1. The prefix, with the N continuations' queries folded into one axis of N * T rows.
    q_prefix = q.transpose(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, groups, num * time, head_dim)
    out_prefix, lse_prefix = blockwise_attention_with_lse(
        q_prefix, prefix_k.astype(q.dtype), prefix_v, mask[..., :slots].reshape(batch, num * time, slots), **blocks)
    out_prefix = out_prefix.reshape(batch, kv_heads, groups, num, time, head_dim).transpose(0, 1, 3, 2, 4, 5)
    lse_prefix = lse_prefix.reshape(batch, kv_heads, groups, num, time).transpose(0, 1, 3, 2, 4)

    # 2. Each continuation's own keys, one row per continuation.
    rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(batch * num, kv_heads, *x.shape[3:])
    out_own, lse_own = blockwise_attention_with_lse(
        rows(q), rows(k).astype(q.dtype), rows(v), mask[..., slots:].reshape(batch * num, time, own), **blocks)
    out_own = jnp.swapaxes(out_own.reshape(batch, num, kv_heads, groups, time, head_dim), 1, 2)
    lse_own = jnp.swapaxes(lse_own.reshape(batch, num, kv_heads, groups, time), 1, 2)

    # 3. The exact merge; rows that see no key anywhere weigh the parts by their key counts.
    sees_key = jnp.any(mask, axis=-1)[:, None, :, None]  # [B, 1, N, 1, T]
    top = jax.lax.stop_gradient(jnp.maximum(lse_prefix, lse_own))
    weight_prefix = jnp.where(sees_key, jnp.exp(lse_prefix - top), float(slots))
    weight_own = jnp.where(sees_key, jnp.exp(lse_own - top), float(own))
    out = (weight_prefix[..., None] * out_prefix.astype(F32) + weight_own[..., None] * out_own.astype(F32))
    return (out / (weight_prefix + weight_own)[..., None]).astype(v.dtype)


__all__ = ["blockwise_prefix_attention"]
