"""Transformer building blocks: norms, rotary embeddings, attention with a KV cache, MLPs.

Shapes: B batch, T new tokens, S key slots (T without a cache, the cache length with one),
D hidden size, H query heads, K key/value heads (H = K * G for grouped-query attention),
Dh head size.

Numerics: parameters live in `config.param_dtype`; matmuls run in `config.dtype`; norms,
rotary embeddings and the attention softmax are computed in float32.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import FULL_ATTENTION, ModelConfig
from rlhf_jax.models.kv_cache import ring_slots
from rlhf_jax.ops.blockwise_attention import blockwise_attention
from rlhf_jax.ops.blockwise_prefix_attention import blockwise_prefix_attention
from rlhf_jax.ops.chunked_head import soft_cap
from rlhf_jax.ops.prefix_attention import prefix_attention

INIT_STD = 0.02  # weight init of fresh (untrained) models, as in GPT-2 and Llama


def take_rows(x, rows):
    """`x[b, rows[b, m]]` for x [B, T, ...] and int rows [B, M] -> [B, M, ...]."""
    index = rows.reshape(rows.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def fold_matmul(x, kernel, *, transpose_kernel: bool = False, accumulate=None):
    """`x @ kernel` (or `x @ kernel.T`) for x [..., D], with x's leading axes folded into one.

    A 2-D product `[N, D] @ [D, F]` differentiates into plain 2-D matmuls on XLA:CPU, where a
    batched contraction over `[B, T, D]` goes through transposed copies in the backward pass.
    `accumulate` is the dtype of the result (`preferred_element_type`), default x's dtype.
    """
    flat = x.reshape(-1, x.shape[-1])
    contract = ((1,), (1,)) if transpose_kernel else ((1,), (0,))
    y = jax.lax.dot_general(flat, kernel, (contract, ((), ())), preferred_element_type=accumulate)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Dense(nn.Module):
    """`y = x @ kernel + bias` with kernel [in, features] (Hugging Face nn.Linear stores the transpose).

    The leading axes of `x` are folded into one before the product: `[B, T, D] @ [D, F]` as
    `[B*T, D] @ [D, F]`. Same parameters and numbers as `nn.Dense`, but XLA:CPU then
    differentiates plain 2-D matmuls instead of batched contractions it feeds through transposed
    copies: -21% time on a DPO step and -27% on a reward-model step on CPU (benchmarks/RESULTS.md).
    """

    features: int
    use_bias: bool
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        kernel = self.param("kernel", nn.initializers.normal(INIT_STD), (x.shape[-1], self.features), param_dtype)
        y = fold_matmul(x.astype(dtype), kernel.astype(dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), param_dtype).astype(dtype)
        return y


def dense(features: int, use_bias: bool, config: ModelConfig, name: str) -> Dense:
    """The model's linear layer in the config's compute and parameter dtypes."""
    return Dense(features, use_bias, config.dtype, config.param_dtype, name=name)


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x**2) + eps) * (scale_offset + scale)` over the last axis, in float32.

    RMSNorm: Zhang & Sennrich 2019 (arXiv:1910.07467). Gemma stores `scale - 1`
    (`scale_offset=1`, initialised at 0); the product is taken in float32 before the cast.
    """

    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.constant(1.0 - self.scale_offset)  # an effective scale of 1
        scale = self.param("scale", init, (x.shape[-1],), jnp.dtype(self.param_dtype))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (scale.astype(jnp.float32) + self.scale_offset)).astype(jnp.dtype(self.dtype))


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    """The family's normalisation layer: RMSNorm (Llama, Qwen, Mistral, Gemma) or LayerNorm (GPT-2)."""
    if config.norm_type == "rmsnorm":
        return RMSNorm(eps=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype,
                       scale_offset=config.norm_scale_offset, name=name)
    return nn.LayerNorm(
        epsilon=config.norm_eps, dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype), use_fast_variance=False, name=name,
    )


def activation_fn(name: str):
    """The MLP non-linearity for a Hugging Face activation name."""
    table = {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }
    return table[name]


def rope_inverse_frequencies(config: ModelConfig, layer_type: str = FULL_ATTENTION) -> np.ndarray:
    """Rotary inverse frequencies `theta ** (-2i / Dh)`, i < Dh/2, after the config's scaling.

    RoPE: Su et al. 2021 (arXiv:2104.09864). "linear" (position interpolation, Chen et al.
    2023, arXiv:2306.15595) divides every frequency by `factor`. "llama3" divides the low
    frequencies (wavelength > original_max / low_freq_factor) by `factor`, keeps the high
    ones (wavelength < original_max / high_freq_factor) and interpolates smoothly between.
    The layers of `layer_type` may have their own RoPE (Gemma 3's sliding layers: `config.rope`).
    Computed with NumPy at trace time, so it is a constant of the compiled program.
    """
    rope = config.rope(layer_type)
    dim = config.dims_per_head
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.type == "linear":
        inv_freq = inv_freq / np.float32(rope.factor)
    elif rope.type == "llama3":
        factor = rope.factor
        old_context = rope.original_max_position_embeddings
        low_wavelen = old_context / rope.low_freq_factor
        high_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    elif rope.type != "default":
        raise ValueError(f"rope scaling type {rope.type!r} is not supported")
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """Rotate `x` [B, T, N, Dh] by angles `positions * inv_freq` (half-split layout).

    `x_rot = x * cos + rotate_half(x) * sin` with `rotate_half([a, b]) = [-b, a]`, the layout
    of Hugging Face Llama checkpoints. Computed in float32, returned in x's dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads and an optional KV cache.

    `softmax(cap(q k^T * s) + mask) v` (Vaswani et al. 2017, arXiv:1706.03762) with
    `s = 1 / sqrt(query_pre_attn_scalar or Dh)` and `cap` the optional soft cap
    `c * tanh(x / c)` (Gemma 2); K < H key/value heads are shared by groups of H/K query heads
    (Ainslie et al. 2023, arXiv:2305.13245). With `qk_norm` each query and key head is
    RMS-normalised before RoPE (Qwen3, Gemma 3). `layer_type` picks the layer's RoPE; its
    span (full or sliding window) is already in the mask it is given. Masked scores get the
    most negative finite float, so rows that see no key (left-padding queries) stay finite.

    Two implementations with the same values and gradients (`config.attention_impl`): the
    plain path materialises the float32 `[B, K, G, T, S]` scores (and the backward pass keeps
    several such arrays per layer); the blockwise path (`ops.blockwise_attention`: online
    softmax over `attention_block_size` blocks, recomputed in the backward pass) never does,
    so attention memory grows linearly in T. "auto" picks blockwise for T > 1 queries when
    T * S exceeds one block, and the plain path for short sequences and KV-cache decode steps.
    """

    config: ModelConfig
    layer_type: str = FULL_ATTENTION

    def setup(self):
        c = self.config
        q_size, kv_size = c.num_heads * c.dims_per_head, c.kv_heads * c.dims_per_head
        if c.fused_qkv:
            self.qkv_proj = dense(q_size + 2 * kv_size, c.qkv_bias, c, "qkv_proj")
        else:
            self.q_proj = dense(q_size, c.qkv_bias, c, "q_proj")
            self.k_proj = dense(kv_size, c.qkv_bias, c, "k_proj")
            self.v_proj = dense(kv_size, c.qkv_bias, c, "v_proj")
        self.o_proj = dense(c.hidden_size, c.attn_out_bias, c, "o_proj")
        if c.qk_norm:
            self.q_norm = make_norm(c, "q_norm")
            self.k_norm = make_norm(c, "k_norm")

    def __call__(self, x, positions, attend_mask, layer_cache=None, cache_index=None, query_rows=None):
        """x [B, T, D]; positions [B, T]; attend_mask [B, T, S] bool (True = may attend).

        With `layer_cache = {"key": [B, K, Dh, S], "value": [B, K, S, Dh]}` the new keys/values are
        written at slots [cache_index, cache_index + T) and attention reads all S slots (a
        sliding layer's `{"window_key", "window_value"}` ring of W slots: the last min(T, W)
        are written into the ring; a decode step (T = 1) reads the written ring,
        `attend_mask` [B, 1, W], a longer call the ring before then the T new tokens,
        [B, T, W + T], see `rlhf_jax.models.kv_cache`); with
        `cache_index=None` the T tokens continue the S cached ones without being written (a
        prefix computed once, continued by a training pass; the cache may hold B / N rows,
        each continued by N consecutive rows of `x`, see `ops.prefix_attention`, and
        `ops.blockwise_prefix_attention` on the blockwise path: neither copies the prefix).
        With `query_rows` [B, M] int, keys and values come from all T tokens but only the M
        tokens `query_rows` query (output [B, M, D]): the last layer of a model whose caller
        reads a few positions.
        Returns (output [B, T or M, D], updated layer cache or None).
        """
        c = self.config
        batch, time, _ = x.shape
        heads, kv_heads, head_dim = c.num_heads, c.kv_heads, c.dims_per_head
        query_positions = positions
        if query_rows is not None:
            query_positions, attend_mask = take_rows(positions, query_rows), take_rows(attend_mask, query_rows)
        if c.fused_qkv:
            qkv = self.qkv_proj(x)
            q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
            q = q if query_rows is None else take_rows(q, query_rows)
        else:
            q = self.q_proj(x if query_rows is None else take_rows(x, query_rows))
            k, v = self.k_proj(x), self.v_proj(x)
        queries = q.shape[1]  # T, or M with query_rows
        q = q.reshape(batch, queries, heads, head_dim)  # [B, Tq, H, Dh]
        k = k.reshape(batch, time, kv_heads, head_dim)  # [B, T, K, Dh]
        v = v.reshape(batch, time, kv_heads, head_dim)  # [B, T, K, Dh]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if c.position_embedding == "rope":
            inv_freq = rope_inverse_frequencies(c, self.layer_type)
            q = apply_rope(q, query_positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        groups = heads // kv_heads
        q = q * jnp.asarray(1.0 / math.sqrt(c.query_pre_attn_scalar or head_dim), q.dtype)
        new_cache = None
        if layer_cache is not None and cache_index is None:  # continuations of a shared prefix
            prefix = layer_cache["key"], layer_cache["value"]
            rows = prefix[0].shape[0]
            if batch % rows:
                raise ValueError(f"{batch} rows cannot continue a cache of {rows} rows: "
                                 "each cached row is continued by the same number of consecutive rows")
            num = batch // rows
            k, v = k.astype(prefix[0].dtype), v.astype(prefix[1].dtype)
            if c.uses_blockwise_attention(queries, prefix[0].shape[-1] + time):
                block = c.attention_block_size
                attention = functools.partial(blockwise_prefix_attention, block_q=block, block_k=block)
            else:
                attention = prefix_attention
            out = attention(
                q.reshape(rows, num, queries, kv_heads, groups, head_dim).transpose(0, 3, 1, 4, 2, 5),
                k.reshape(rows, num, time, kv_heads, head_dim).transpose(0, 3, 1, 4, 2),
                v.reshape(rows, num, time, kv_heads, head_dim).transpose(0, 3, 1, 2, 4),
                *prefix, attend_mask.reshape(rows, num, queries, -1), softcap=c.attn_logit_softcap,
            )  # [B / N, K, N, G, Tq, Dh]
            out = out.transpose(0, 2, 4, 1, 3, 5).reshape(batch, queries, heads * head_dim)
            return self.o_proj(out.astype(jnp.dtype(c.dtype))), None
        # Heads-major layouts in which both attention matmuls are plain batched products
        # (no transposed operand, no copy of the cache): keys [B, K, Dh, S], values [B, K, S, Dh].
        k = k.transpose(0, 2, 3, 1)  # [B, K, Dh, T]
        v = v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        ring = None  # a sliding layer's W ring slots as they were before this call (kv_cache docstring)
        if layer_cache is not None and "window_key" in layer_cache:
            ring_k, ring_v = layer_cache["window_key"], layer_cache["window_value"]
            k, v = k.astype(ring_k.dtype), v.astype(ring_v.dtype)
            where, first = ring_slots(cache_index, time, ring_k.shape[-1])
            new_cache = {"window_key": ring_k.at[:, :, :, where].set(k[..., first:]),
                         "window_value": ring_v.at[:, :, where, :].set(v[:, :, first:, :])}
            if time == 1:  # a decode step reads the ring it wrote (updated in place)
                k, v = new_cache["window_key"], new_cache["window_value"]
            elif c.uses_blockwise_attention(queries, ring_k.shape[-1] + time):  # a long prefill: join them
                k = jnp.concatenate([ring_k, k], axis=-1)  # [B, K, Dh, W + T]: attend_mask's order
                v = jnp.concatenate([ring_v, v], axis=-2)  # [B, K, W + T, Dh]
            else:  # scores of the ring and of the new tokens side by side: no copy of the ring
                ring = ring_k, ring_v
        elif layer_cache is not None:
            cache_dtype = layer_cache["key"].dtype
            k = jax.lax.dynamic_update_slice(
                layer_cache["key"], k.astype(cache_dtype), (0, 0, 0, cache_index)
            )  # [B, K, Dh, S]
            v = jax.lax.dynamic_update_slice(
                layer_cache["value"], v.astype(cache_dtype), (0, 0, cache_index, 0)
            )  # [B, K, S, Dh]
            new_cache = {"key": k, "value": v}

        # Query rows of a key/value head's group, [B, K, G*T, Dh]: with one batch axis pair and
        # one contracted axis, both products and their gradients are plain batched matmuls.
        q = q.reshape(batch, queries, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
        q = q.reshape(batch, kv_heads, groups * queries, head_dim)
        if c.uses_blockwise_attention(queries, k.shape[-1]):
            out = blockwise_attention(
                q.reshape(batch, kv_heads, groups, queries, head_dim), k.astype(q.dtype), v, attend_mask,
                softcap=c.attn_logit_softcap, block_q=c.attention_block_size, block_k=c.attention_block_size,
            )  # [B, K, G, T, Dh], no [.., T, S] scores in the forward or backward pass
        else:
            qk = lambda keys: jnp.einsum("bkqd,bkds->bkqs", q, keys.astype(q.dtype),
                                         preferred_element_type=jnp.float32)
            scores = qk(k) if ring is None else jnp.concatenate([qk(ring[0]), qk(k)], axis=-1)
            scores = scores.reshape(batch, kv_heads, groups, queries, -1)  # [B, K, G, T, S]
            scores = soft_cap(scores, c.attn_logit_softcap)
            scores = jnp.where(attend_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(batch, kv_heads, groups * queries, -1)
            if ring is None:
                out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
            else:
                slots = ring[1].shape[2]
                out = (jnp.einsum("bkqs,bksd->bkqd", probs[..., :slots], ring[1])
                       + jnp.einsum("bkqs,bksd->bkqd", probs[..., slots:], v))
            out = out.reshape(batch, kv_heads, groups, queries, head_dim)
        out = out.transpose(0, 3, 1, 2, 4).reshape(batch, queries, heads * head_dim)
        out = out.astype(jnp.dtype(c.dtype))
        return self.o_proj(out), new_cache


class MLP(nn.Module):
    """Gated (SwiGLU / GeGLU, Shazeer 2020, arXiv:2002.05202) or plain two-layer feed-forward block."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        c = self.config
        act = activation_fn(c.activation)
        if c.gated_mlp:
            gate = dense(c.intermediate_size, c.mlp_bias, c, "gate_proj")(x)
            up = dense(c.intermediate_size, c.mlp_bias, c, "up_proj")(x)
            return dense(c.hidden_size, c.mlp_bias, c, "down_proj")(act(gate) * up)
        hidden = act(dense(c.intermediate_size, c.mlp_bias, c, "fc_in")(x))
        return dense(c.hidden_size, c.mlp_bias, c, "fc_out")(hidden)
