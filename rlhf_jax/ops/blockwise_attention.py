"""Memory-efficient attention: softmax attention over blocks of queries and keys, with a
custom VJP that recomputes each block's scores in the backward pass.

For queries q (already scaled), keys k, values v and a boolean mask M (True = may attend):

    s_ij = cap(q_i . k_j),   cap(x) = c * tanh(x / c)   (Gemma 2's soft cap; identity when c is None)
    s_ij = MIN where not M_ij                           (MIN: the most negative finite float32)
    out_i = sum_j softmax_j(s_i)_j v_j

computed with the online softmax of Rabe & Staats 2021 ("Self-attention does not need O(n^2)
memory", arXiv:2112.05682) and FlashAttention (Dao et al. 2022, arXiv:2205.14135; the
backward pass of FlashAttention-2, Dao 2023, arXiv:2307.08691): for each block of queries a
scan over blocks of keys carries the running row maximum m, the running normaliser
l = sum_j exp(s_ij - m) and the unnormalised output sum_j exp(s_ij - m) v_j; out = acc / l.
The backward pass recomputes each block's probabilities from the saved (m, l):

    p_ij = exp(s_ij - m_i) / l_i,        D_i = sum_d dout_id out_id
    dv_j += sum_i p_ij dout_i,           dp_ij = dout_i . v_j
    ds_ij = p_ij (dp_ij - D_i) * M_ij * cap'(x_ij),   cap'(x) = 1 - tanh(x / c)^2
    dq_i += sum_j ds_ij k_j,             dk_j += sum_i ds_ij q_i

so neither pass holds more than one `[B, K, G, block_q, block_k]` block of scores: memory is
linear in the sequence length (plus the boolean mask `[B, T, S]` it is given).

`blockwise_attention_with_lse` also returns each row's log-sum-exp of its scores,

    lse_i = log sum_j exp(s_ij) = m_i + log l_i        (float32, [B, K, G, T])

differentiable like the output: since d lse_i / d s_ij = p_ij, a cotangent g_i on lse_i adds
g_i p_ij to ds_ij, which is the backward pass above with D_i replaced by D_i - g_i. Two
attentions of the same queries over disjoint key sets merge exactly through it (see
`ops.blockwise_prefix_attention`).

Masked scores take MIN rather than -inf, exactly as the plain softmax path does: a query
row that sees no key at all (a left-padding position) gets the uniform average of all S
values in both paths. Key padding added to fill the last block is -inf (it never counts).
A block whose mask is all False is skipped (`lax.cond`) when every query row of the block
sees some key (then its weights are exactly 0): a causal mask skips about half the blocks.

Layouts (grouped-query attention: K key/value heads, G = H / K query heads per key head):
q [B, K, G, T, Dh], k [B, K, Dh, S] (keys transposed, the KV cache's layout),
v [B, K, S, Dh], mask [B, T, S] bool. Scores and accumulators are float32; the products run
in q's dtype with float32 accumulation; the output has v's dtype.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MIN = float(jnp.finfo(jnp.float32).min)
F32 = jnp.float32


def _pad_axis(x, axis: int, size: int, value=0):
    """`x` padded at the end of `axis` to `size` entries of `value`."""
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _slice(x, axis: int, start, size: int):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _block_scores(q_block, k_block, mask_block, key_valid, softcap):
    """Masked (and soft-capped) float32 scores [B, K, G, bq, bk] and tanh(x / c) (or None)."""
    scores = jnp.einsum("bkgqd,bkds->bkgqs", q_block, k_block, preferred_element_type=F32)
    tanh = None
    if softcap is not None:
        tanh = jnp.tanh(scores / softcap)
        scores = softcap * tanh
    scores = jnp.where(mask_block[:, None, None], scores, MIN)
    return jnp.where(key_valid, scores, -jnp.inf), tanh


class _Blocks:
    """Block sizes and padded lengths of one call."""

    def __init__(self, time: int, slots: int, block_q: int, block_k: int):
        self.time, self.slots = time, slots
        self.bq, self.bk = min(block_q, time), min(block_k, slots)
        self.nq, self.nk = math.ceil(time / self.bq), math.ceil(slots / self.bk)
        self.tp, self.sp = self.nq * self.bq, self.nk * self.bk

    def key_valid(self, j):
        return j * self.bk + jnp.arange(self.bk) < self.slots


def _skip_block(mask_block, sees_key_block):
    """True when a block may be skipped: nothing in it is attended and every query row of the
    block attends some key elsewhere (so the block's exact weights are 0)."""
    return jnp.logical_and(~jnp.any(mask_block), jnp.all(sees_key_block))


def _forward(q, k, v, mask, softcap, block_q, block_k):
    """(out [B, K, G, T, Dh] in v's dtype, row max m and normaliser l [B, K, G, T] float32)."""
    batch, kv_heads, groups, time, head_dim = q.shape
    blocks = _Blocks(time, k.shape[-1], block_q, block_k)
    qp = _pad_axis(q, 3, blocks.tp)
    kp, vp = _pad_axis(k, 3, blocks.sp), _pad_axis(v, 2, blocks.sp)
    maskp = _pad_axis(_pad_axis(mask, 1, blocks.tp, False), 2, blocks.sp, False)
    sees_key = _pad_axis(jnp.any(mask, axis=-1), 1, blocks.tp, True)  # [B, Tp]
    stat_shape = (batch, kv_heads, groups, blocks.bq)

    def query_block(_, i):
        q_block = _slice(qp, 3, i * blocks.bq, blocks.bq)
        mask_rows = _slice(maskp, 1, i * blocks.bq, blocks.bq)
        sees_key_block = _slice(sees_key, 1, i * blocks.bq, blocks.bq)

        def key_block(carry, j):
            mask_block = _slice(mask_rows, 2, j * blocks.bk, blocks.bk)

            def update(carry):
                m, l, acc = carry
                scores, _ = _block_scores(q_block, _slice(kp, 3, j * blocks.bk, blocks.bk), mask_block,
                                          blocks.key_valid(j), softcap)
                m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(scores - m_new[..., None])
                l_new = l * alpha + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(q.dtype),
                                _slice(vp, 2, j * blocks.bk, blocks.bk).astype(q.dtype), preferred_element_type=F32)
                return m_new, l_new, acc * alpha[..., None] + pv

            skip = _skip_block(mask_block, sees_key_block)
            return jax.lax.cond(skip, lambda c: c, update, carry), None

        init = (jnp.full(stat_shape, MIN, F32), jnp.zeros(stat_shape, F32),
                jnp.zeros((*stat_shape, head_dim), F32))
        (m, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(blocks.nk))
        return None, ((acc / l[..., None]).astype(v.dtype), m, l)

    _, (out, m, l) = jax.lax.scan(query_block, None, jnp.arange(blocks.nq))
    # [nq, B, K, G, bq, ...] -> [B, K, G, Tp, ...], cut to T
    join = lambda x: jnp.moveaxis(x, 0, 3).reshape(*x.shape[1:4], blocks.tp, *x.shape[5:])[:, :, :, :time]
    return join(out), join(m), join(l)


def _backward(q, k, v, mask, out, m, l, dout, dlse, softcap, block_q, block_k):
    """(dq, dk, dv) in the dtypes of q, k, v (FlashAttention-2's backward pass, module doc),
    for cotangents `dout` on the output and `dlse` on the rows' log-sum-exp."""
    time, slots = q.shape[3], k.shape[-1]
    blocks = _Blocks(time, slots, block_q, block_k)
    # D_i - g_i [B, K, G, T]: the lse cotangent enters as d lse_i / d s_ij = p_ij.
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), axis=-1) - dlse.astype(F32)
    qp, dop = _pad_axis(q, 3, blocks.tp), _pad_axis(dout, 3, blocks.tp)
    mp, lp = _pad_axis(m, 3, blocks.tp), _pad_axis(l, 3, blocks.tp, 1.0)
    deltap = _pad_axis(delta, 3, blocks.tp)
    kp, vp = _pad_axis(k, 3, blocks.sp), _pad_axis(v, 2, blocks.sp)
    maskp = _pad_axis(_pad_axis(mask, 1, blocks.tp, False), 2, blocks.sp, False)
    sees_key = _pad_axis(jnp.any(mask, axis=-1), 1, blocks.tp, True)
    dtype = q.dtype

    def key_block(dq, j):
        k_block = _slice(kp, 3, j * blocks.bk, blocks.bk).astype(dtype)  # [B, K, Dh, bk]
        v_block = _slice(vp, 2, j * blocks.bk, blocks.bk).astype(dtype)  # [B, K, bk, Dh]
        mask_cols = _slice(maskp, 2, j * blocks.bk, blocks.bk)
        key_valid = blocks.key_valid(j)

        def query_block(carry, i):
            mask_block = _slice(mask_cols, 1, i * blocks.bq, blocks.bq)

            def update(carry):
                dq, dk, dv = carry
                rows = lambda x: _slice(x, 3, i * blocks.bq, blocks.bq)
                q_block, do_block = rows(qp), rows(dop).astype(dtype)
                scores, tanh = _block_scores(q_block, k_block, mask_block, key_valid, softcap)
                p = jnp.exp(scores - rows(mp)[..., None]) / rows(lp)[..., None]
                dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dtype), do_block, preferred_element_type=F32)
                dp = jnp.einsum("bkgqd,bksd->bkgqs", do_block, v_block, preferred_element_type=F32)
                ds = p * (dp - rows(deltap)[..., None])
                ds = jnp.where(mask_block[:, None, None] & key_valid, ds, 0.0)
                if tanh is not None:
                    ds = ds * (1.0 - tanh * tanh)
                ds = ds.astype(dtype)
                dq_block = rows(dq) + jnp.einsum("bkgqs,bkds->bkgqd", ds, k_block, preferred_element_type=F32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_block, i * blocks.bq, 3)
                dk = dk + jnp.einsum("bkgqs,bkgqd->bkds", ds, q_block, preferred_element_type=F32)
                return dq, dk, dv

            skip = _skip_block(mask_block, _slice(sees_key, 1, i * blocks.bq, blocks.bq))
            return jax.lax.cond(skip, lambda c: c, update, carry), None

        batch, kv_heads, head_dim = k.shape[0], k.shape[1], k.shape[2]
        init = (dq, jnp.zeros((batch, kv_heads, head_dim, blocks.bk), F32),
                jnp.zeros((batch, kv_heads, blocks.bk, head_dim), F32))
        (dq, dk, dv), _ = jax.lax.scan(query_block, init, jnp.arange(blocks.nq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qp.shape, F32), jnp.arange(blocks.nk))
    # dk [nk, B, K, Dh, bk] -> [B, K, Dh, Sp]; dv [nk, B, K, bk, Dh] -> [B, K, Sp, Dh]
    dk = jnp.moveaxis(dk, 0, 3).reshape(*k.shape[:3], blocks.sp)[..., :slots]
    dv = jnp.moveaxis(dv, 0, 2).reshape(*v.shape[:2], blocks.sp, v.shape[-1])[:, :, :slots]
    return dq[:, :, :, :time].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, softcap, block_q, block_k):
    """(out, lse): the output and each row's float32 log-sum-exp `m + log l` (module doc)."""
    out, m, l = _forward(q, k, v, mask, softcap, block_q, block_k)
    return out, m + jnp.log(l)


def _attention_fwd(q, k, v, mask, softcap, block_q, block_k):
    out, m, l = _forward(q, k, v, mask, softcap, block_q, block_k)
    return (out, m + jnp.log(l)), (q, k, v, mask, out, m, l)


def _attention_bwd(softcap, block_q, block_k, residuals, cotangents):
    q, k, v, mask, out, m, l = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, mask, out, m, l, dout, dlse, softcap, block_q, block_k)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _checked(q, k, v, mask, softcap, block_q, block_k):
    """The arguments of `_attention` after checking their shapes."""
    batch, kv_heads, groups, time, head_dim = q.shape
    slots = k.shape[-1]
    if k.shape != (batch, kv_heads, head_dim, slots) or v.shape != (batch, kv_heads, slots, head_dim):
        raise ValueError(f"expected k [B, K, Dh, S] and v [B, K, S, Dh] for q {q.shape}, got {k.shape}, {v.shape}")
    if mask.shape != (batch, time, slots):
        raise ValueError(f"expected mask [B, T, S] = {(batch, time, slots)}, got {mask.shape}")
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"block sizes must be > 0, got {block_q}, {block_k}")
    softcap = None if softcap is None else float(softcap)
    return q, k, v, jnp.asarray(mask, bool), softcap, int(block_q), int(block_k)


def blockwise_attention(q, k, v, mask, *, softcap: float | None = None, block_q: int = 512,
                        block_k: int = 512):
    """Attention output [B, K, G, T, Dh] (v's dtype) without materialising `[.., T, S]` scores.

    q [B, K, G, T, Dh] (scaled), k [B, K, Dh, S], v [B, K, S, Dh], mask [B, T, S] bool;
    `softcap` c applies `c * tanh(s / c)` to the scores before masking; queries and keys are
    processed `block_q` x `block_k` at a time (the module docstring has the algorithm).
    Same values and gradients as the plain softmax path to float32 rounding.
    """
    return _attention(*_checked(q, k, v, mask, softcap, block_q, block_k))[0]


def blockwise_attention_with_lse(q, k, v, mask, *, softcap: float | None = None, block_q: int = 512,
                                 block_k: int = 512):
    """(out, lse): `blockwise_attention`'s output and each query row's log-sum-exp of its scores,

        lse_i = log sum_j exp(s_ij) = m_i + log l_i        [B, K, G, T] float32,

    masked scores counted as MIN (so a row that sees no key has `lse = MIN + log S`, which is
    MIN in float32). Both outputs are differentiable: a cotangent g on lse enters the backward
    pass as `D_i - g_i` (module doc). Same arguments as `blockwise_attention`.
    """
    return _attention(*_checked(q, k, v, mask, softcap, block_q, block_k))


__all__ = ["blockwise_attention", "blockwise_attention_with_lse"]
