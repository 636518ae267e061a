"""Token statistics of a language-model head computed block by block, never holding `[tokens, V]`.

For hidden states `h` [..., D], an output kernel `W` ([D, V], or a tied `[V, D]` embedding),
an optional final-logit soft-cap `c` (Gemma 2) and a temperature `T`:

    a = h W                                  (compute dtype, float32 accumulation)
    z = s(a) / T,   s(a) = c * tanh(a / c)   (s = identity when c is None)
    logsumexp   = log sum_v exp(z_v)
    logprob     = z_y - logsumexp            (y = the scored token)
    mean_logit  = (1 / V) sum_v z_v          (label smoothing: mean_v log p_v = mean_logit - logsumexp)
    entropy     = logsumexp - sum_v p_v z_v,  p = softmax(z)
    is_argmax   = 1 if y = argmax_v z_v else 0   (piecewise constant: zero gradient)

Kept-set replay of top-k / top-p sampling (`kept_threshold`, `rlhf_jax.ops.kept_set`): with a
per-position threshold t (units of z; -inf = nothing excluded) the statistics are those of
the kept distribution the token was drawn from,

    kept_v      = [z_v >= min(t, z_y)]           (the drawn token is always kept)
    logsumexp   = log sum_{v kept} exp(z_v)
    logprob     = z_y - logsumexp
    entropy     = logsumexp - sum_v p_v z_v,  p_v = exp(z_v - logsumexp) if kept_v else 0

while mean_logit stays the mean of z over the whole vocabulary (so `mean_logprob` is
mean_v z_v minus the kept set's logsumexp) and is_argmax is unchanged (the argmax is always
kept). `full_logsumexp` is always `log sum_v exp(z_v)` over the whole vocabulary, so
`full_logprob = z_y - full_logsumexp` scores the unfiltered `softmax(z)` (what a KL to an
unfiltered reference compares) in the same pass. Without thresholds the blocks trace no
mask and `full_logsumexp` is `logsumexp`: the program is the plain one.

The positions are flattened and processed in blocks of `chunk_size` rows with `lax.scan`;
a block's `[chunk_size, V]` logits live only inside one loop iteration. The gradient is a
custom VJP that recomputes each block's logits from the saved `h`, `W` and the per-position
`logsumexp` and `E_p[z]`, and forms, per block (g_* the cotangents of the outputs):

    dz = p * (g_lse - g_logprob - g_entropy * (z - E_p[z])) + g_mean / V + g_logprob * onehot(y)
         + softmax(z) * g_full_lse
    da = dz / T * (1 - (s(a) / c)^2)            (no factor without a soft-cap)
    dh = da W^T,   dW += h^T da                 (dW accumulated in float32 over the blocks)

With thresholds, p is the kept distribution above (0 outside the kept set); the mask is
piecewise constant in z and gets no gradient, as autodiff of `kept_set_logits` gives. The
threshold itself gets none either.

The backward pass holds a few `[chunk_size, V]` blocks and one float32 `[D, V]` gradient,
whatever the number of positions. Each block's `h^T da` is added in `KERNEL_GRAD_PIECES`
vocabulary slices, so no second `[D, V]` product sits next to the gradient (on the probe of
benchmarks/RESULTS.md, V = 151,936, D = 256, that cut an SFT step's XLA estimate by 90 MB). This is the memory behaviour of fused/"cut" cross-entropy
heads (Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
arXiv:2411.09009): peak memory independent of the number of tokens. The cost is one extra
`[tokens, D] x [D, V]` matmul (the recomputation in the backward pass).

A rematerialised scan (`jax.checkpoint` around each block's log-softmax, autodiff for the
rest) needs the same memory: XLA's temporaries for value-and-gradient of the log-probs at
V = 151,936, D = 256, blocks of 108 positions were 221 MB for both at 1,080, 2,160 and 4,320
positions, and the same time on CPU (V = 32,000: 4.8 s vs 4.7 s on a loaded machine). The
custom VJP is kept because it differentiates all four statistics in one recomputation with
the closed forms above and reuses the saved `logsumexp` and `E_p[z]`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_positive
from rlhf_jax.ops.kept_set import kept_mask

# A block holds about this many logits (64 MiB in float32): chunk_size = budget / V positions.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
# The backward pass adds each block's kernel gradient in this many vocabulary slices.
KERNEL_GRAD_PIECES = 8


class OutputHead(NamedTuple):
    """The vocabulary projection of a language model, as plain arrays and settings."""

    kernel: jax.Array  # [D, V] (untied `lm_head`), or [V, D] when `vocab_major` (tied embedding)
    vocab_major: bool = False  # kernel is [V, D]: logits = h @ kernel.T
    softcap: float | None = None  # final-logit soft-cap c (Gemma 2); None = off

    @property
    def vocab_size(self) -> int:
        return self.kernel.shape[0] if self.vocab_major else self.kernel.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.kernel.shape[1] if self.vocab_major else self.kernel.shape[0]


class HeadStats(NamedTuple):
    """Per-position statistics of `softmax(z)`, shaped like the scored tokens, float32."""

    logprobs: jax.Array  # log p_y
    logsumexp: jax.Array  # log sum_v exp(z_v)
    mean_logit: jax.Array  # mean_v z_v
    entropy: jax.Array  # -sum_v p_v log p_v
    is_argmax: jax.Array  # 1.0 where y = argmax_v z_v (no gradient)
    full_logsumexp: jax.Array  # log sum_v exp(z_v) over the whole vocabulary (= logsumexp without a kept set)

    @property
    def mean_logprob(self) -> jax.Array:
        """`mean_v log p_v`, the uniform-target term of label-smoothed cross-entropy."""
        return self.mean_logit - self.logsumexp

    @property
    def full_logprobs(self) -> jax.Array:
        """`z_y - log sum_v exp(z_v)`: log p_y under the unfiltered `softmax(z)` (= `logprobs`
        without a kept set)."""
        return self.logprobs + self.logsumexp - self.full_logsumexp


def soft_cap(x, cap: float | None):
    """`cap * tanh(x / cap)` (Gemma 2's logit soft-capping); identity when `cap` is None."""
    if cap is None:
        return x
    return jnp.tanh(x / cap) * cap


def default_chunk_size(vocab_size: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Positions per block so that one block holds about `block_elements` logits (at least 8)."""
    return max(8, block_elements // vocab_size)


def head_logits(hidden, head: OutputHead):
    """Full float32 logits `s(h W)` [..., V] (no temperature): the reference the blocks compute."""
    kernel = head.kernel
    contract = ((1,), (1,)) if head.vocab_major else ((1,), (0,))
    flat = hidden.reshape(-1, hidden.shape[-1]).astype(kernel.dtype)
    logits = jax.lax.dot_general(flat, kernel, (contract, ((), ())), preferred_element_type=jnp.float32)
    return soft_cap(logits, head.softcap).reshape(*hidden.shape[:-1], -1)


def _block_logits(hidden_block, kernel, vocab_major, softcap, temperature):
    """`(z, capped)` for one block: z = s(h W) / T [C, V] float32 and s(h W) (for the VJP)."""
    contract = ((1,), (1,)) if vocab_major else ((1,), (0,))
    raw = jax.lax.dot_general(hidden_block.astype(kernel.dtype), kernel, (contract, ((), ())),
                              preferred_element_type=jnp.float32)
    capped = soft_cap(raw, softcap)
    return capped / temperature, capped


def _block_stats(z, tokens, threshold=None):
    """Forward statistics of one block of scaled logits z [C, V] and tokens [C] (of the kept
    distribution when `threshold` [C] is given): the first five `HeadStats` fields, `E_p[z]`,
    and with `threshold` the whole vocabulary's logsumexp."""
    top = jnp.max(z, axis=-1, keepdims=True)  # always kept: z_max >= z_y >= min(t, z_y)
    exp = jnp.exp(z - top)
    picked = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    full_lse = None
    if threshold is not None:
        full_lse = top[:, 0] + jnp.log(jnp.sum(exp, axis=-1))
        exp = jnp.where(kept_mask(z, picked, threshold), exp, 0.0)
    total = jnp.sum(exp, axis=-1)
    lse = top[:, 0] + jnp.log(total)
    expected = jnp.sum(exp * z, axis=-1) / total  # E_p[z]
    is_argmax = (jnp.argmax(z, axis=-1) == tokens).astype(jnp.float32)
    stats = (picked - lse, lse, jnp.mean(z, axis=-1), lse - expected, is_argmax)
    return stats + (expected,) if full_lse is None else stats + (expected, full_lse)


def _blocks(x, chunk_size):
    """[N, ...] -> [ceil(N / C), C, ...], zero-padded at the end."""
    count = x.shape[0]
    padded = math.ceil(count / chunk_size) * chunk_size
    x = jnp.pad(x, [(0, padded - count)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(padded // chunk_size, chunk_size, *x.shape[1:])


def _unblock(x, count):
    return x.reshape(-1, *x.shape[2:])[:count]


def _maybe_blocks(x, chunk_size):
    """`_blocks`, passing None (no kept-set thresholds) through: the scans then carry no
    threshold and trace the plain statistics, so that path's program is unchanged."""
    return None if x is None else _blocks(x, chunk_size)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flat_head_stats(hidden, kernel, tokens, temperature, threshold, vocab_major, softcap, chunk_size):
    return _flat_forward(hidden, kernel, tokens, temperature, threshold, vocab_major, softcap, chunk_size)[0]


def _flat_forward(hidden, kernel, tokens, temperature, threshold, vocab_major, softcap, chunk_size):
    count = hidden.shape[0]

    def body(_, block):
        hidden_block, token_block, threshold_block = block
        z, _ = _block_logits(hidden_block, kernel, vocab_major, softcap, temperature)
        return None, _block_stats(z, token_block, threshold_block)

    blocks = (_blocks(hidden, chunk_size), _blocks(tokens, chunk_size), _maybe_blocks(threshold, chunk_size))
    _, stats = jax.lax.scan(body, None, blocks)
    stats = tuple(_unblock(s, count) for s in stats)
    # without a kept set the whole vocabulary's logsumexp is the logsumexp (no second scan output)
    full_lse = stats[1] if threshold is None else stats[6]
    return stats[:5] + (full_lse,), (stats[1], stats[5], full_lse)  # outputs; (lse, E_p[z], full) for the VJP


def _flat_fwd(hidden, kernel, tokens, temperature, threshold, vocab_major, softcap, chunk_size):
    outputs, (lse, expected, full_lse) = _flat_forward(hidden, kernel, tokens, temperature, threshold,
                                                       vocab_major, softcap, chunk_size)
    return outputs, (hidden, kernel, tokens, temperature, threshold, lse, expected,
                     None if threshold is None else full_lse)


def _flat_bwd(vocab_major, softcap, chunk_size, residuals, cotangents):
    hidden, kernel, tokens, temperature, threshold, lse, expected, full_lse = residuals
    g_logprob, g_lse, g_mean, g_entropy, _, g_full = (jnp.asarray(g, jnp.float32) for g in cotangents)
    count, vocab = hidden.shape[0], kernel.shape[0 if vocab_major else 1]
    if threshold is None:  # full_logsumexp is logsumexp: one softmax carries both cotangents
        g_lse, full = g_lse + g_full, None
    else:
        full = (full_lse, g_full)
    per_position = (tokens, lse, expected, g_logprob, g_lse, g_mean, g_entropy)

    def body(kernel_grad, block):
        hidden_block, threshold_block, full_block, token_block, lse_b, expected_b, g_lp, g_ls, g_mn, g_en = block
        z, capped = _block_logits(hidden_block, kernel, vocab_major, softcap, temperature)
        probs = jnp.exp(z - lse_b[:, None])
        extra = None
        if threshold_block is not None:  # p_v = 0 outside the kept set; no gradient through the mask
            picked = jnp.take_along_axis(z, token_block[:, None], axis=-1)[:, 0]
            full_lse_b, g_fl = full_block  # softmax(z) = the unmasked exp(z - lse) * exp(lse - full_lse)
            extra = probs * (jnp.exp(lse_b - full_lse_b) * g_fl)[:, None]
            probs = jnp.where(kept_mask(z, picked, threshold_block), probs, 0.0)
        dz = probs * ((g_ls - g_lp)[:, None] - g_en[:, None] * (z - expected_b[:, None])) + (g_mn / vocab)[:, None]
        if extra is not None:
            dz = dz + extra
        dz = dz.at[jnp.arange(dz.shape[0]), token_block].add(g_lp)
        da = dz / temperature
        if softcap is not None:
            da = da * (1.0 - jnp.square(capped / softcap))
        da = da.astype(kernel.dtype)
        h = hidden_block.astype(kernel.dtype)
        hidden_grad = jax.lax.dot_general(da, kernel, (((1,), (0 if vocab_major else 1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        return _add_kernel_grad(kernel_grad, h, da, vocab_major), hidden_grad.astype(hidden.dtype)

    blocks = ((_blocks(hidden, chunk_size), _maybe_blocks(threshold, chunk_size),
               None if full is None else tuple(_blocks(x, chunk_size) for x in full))
              + tuple(_blocks(x, chunk_size) for x in per_position))
    kernel_grad, hidden_grad = jax.lax.scan(body, jnp.zeros(kernel.shape, jnp.float32), blocks)
    return (_unblock(hidden_grad, count), kernel_grad.astype(kernel.dtype), None,
            jnp.zeros_like(temperature), None if threshold is None else jnp.zeros_like(threshold))


def _add_kernel_grad(kernel_grad, h, da, vocab_major):
    """`kernel_grad + h^T da` ([D, V]; `da^T h` [V, D] when vocab-major), added slice by slice
    over `KERNEL_GRAD_PIECES` pieces of the vocabulary, so that besides the float32 gradient
    only one `[D, V / pieces]` product is alive (one whole `[D, V]` product would double the
    head's largest buffer). The last piece is aligned to the vocabulary's end; its columns that
    an earlier piece covered are zeroed in `da` first."""
    vocab, axis = da.shape[1], 0 if vocab_major else 1
    width = math.ceil(vocab / min(KERNEL_GRAD_PIECES, vocab))
    pieces = math.ceil(vocab / width)

    def add_piece(i, kernel_grad):
        start = jnp.minimum(i * width, vocab - width)
        piece = jax.lax.dynamic_slice_in_dim(da, start, width, 1)
        piece = jnp.where(start + jnp.arange(width) >= i * width, piece, 0).astype(da.dtype)
        if vocab_major:  # [width, D] = piece^T h
            step = jax.lax.dot_general(piece, h, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        else:  # [D, width] = h^T piece
            step = jax.lax.dot_general(h, piece, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        current = jax.lax.dynamic_slice_in_dim(kernel_grad, start, width, axis)
        return jax.lax.dynamic_update_slice_in_dim(kernel_grad, current + step, start, axis)

    return jax.lax.fori_loop(0, pieces, add_piece, kernel_grad)


_flat_head_stats.defvjp(_flat_fwd, _flat_bwd)


def chunked_head_stats(hidden, head: OutputHead, tokens, *, temperature=1.0, chunk_size: int | None = None,
                       kept_threshold=None):
    """`HeadStats` of `softmax(s(hidden @ W) / T)` at every position, block by block (of the
    kept distribution of top-k / top-p sampling with `kept_threshold`, module docstring).

    Args:
      hidden: `[..., D]` final hidden states (any float dtype; cast to the kernel's dtype for
        the matmul, accumulated in float32).
      head: `OutputHead` (kernel in the compute dtype, layout, soft-cap).
      tokens: `[...]` integer token ids in `[0, V)` to score, the leading shape of `hidden`.
      temperature: `T > 0`, a Python float or a traced scalar (no gradient flows to it).
      chunk_size: positions per block; None = `default_chunk_size(V)`.
      kept_threshold: optional `[...]` float32 kept-set thresholds `t` in units of `z`, shaped
        like `tokens` (`-inf` = nothing excluded; `rlhf_jax.ops.kept_set`). None = the full
        softmax (the program is then the same as without the argument). No gradient flows to it.

    Returns:
      `HeadStats` of `[...]` float32 arrays. Gradients flow to `hidden` and `head.kernel`.
    """
    check_positive(temperature, "temperature")
    if jnp.ndim(temperature) != 0:
        raise ValueError(f"`temperature` must be a scalar, got shape {jnp.shape(temperature)}")
    if hidden.shape[-1] != head.hidden_size:
        raise ValueError(f"`hidden` [..., {hidden.shape[-1]}] does not match the head's hidden size "
                         f"{head.hidden_size} (kernel {head.kernel.shape})")
    if jnp.shape(tokens) != hidden.shape[:-1]:
        raise ValueError(f"`tokens` must have shape {hidden.shape[:-1]} (hidden's leading axes), "
                         f"got {jnp.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"`tokens` must hold integer ids, got dtype {jnp.result_type(tokens)}")
    if head.softcap is not None and not head.softcap > 0:
        raise ValueError(f"the final-logit soft-cap must be > 0 or None, got {head.softcap}")
    if kept_threshold is not None:
        if jnp.shape(kept_threshold) != hidden.shape[:-1]:
            raise ValueError(f"`kept_threshold` must have shape {hidden.shape[:-1]} (hidden's leading axes), "
                             f"got {jnp.shape(kept_threshold)}")
        kept_threshold = jax.lax.stop_gradient(jnp.asarray(kept_threshold, jnp.float32).reshape(-1))
    chunk = default_chunk_size(head.vocab_size) if chunk_size is None else int(chunk_size)
    if chunk <= 0:
        raise ValueError(f"`chunk_size` must be > 0, got {chunk_size}")
    leading = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    count = flat_hidden.shape[0]
    blocks = max(1, math.ceil(count / chunk))
    chunk = max(1, math.ceil(count / blocks))  # the same number of blocks, least padding
    stats = _flat_head_stats(flat_hidden, head.kernel, jnp.asarray(tokens, jnp.int32).reshape(-1),
                             jnp.asarray(temperature, jnp.float32), kept_threshold, bool(head.vocab_major),
                             None if head.softcap is None else float(head.softcap), chunk)
    return HeadStats(*(s.reshape(leading) for s in stats))


__all__ = ["DEFAULT_BLOCK_ELEMENTS", "HeadStats", "OutputHead", "chunked_head_stats", "default_chunk_size",
           "head_logits", "soft_cap"]
