"""One configuration for every decoder-only model here: GPT-2, Llama, Qwen2, Qwen3, Mistral,
Gemma 2 and Gemma 3 (text).

`ModelConfig` is a frozen (hashable) dataclass, so a module built from it can be a static
argument of `jax.jit`. The family presets (`ModelConfig.gpt2`, `.llama`, `.qwen2`, `.qwen3`,
`.mistral`, `.gemma2`, `.gemma3_text`) fill the fields that differ between families:

    gpt2         learned positions, LayerNorm, GELU MLP, fused biased QKV, tied embeddings
    llama        RoPE, RMSNorm, SwiGLU, grouped-query attention (the base layout)
    qwen2        llama + q/k/v biases
    qwen3        llama + per-head RMSNorm of q and k before RoPE, explicit head_dim; optional
                 sliding windows on the layers from `max_window_layers` on
    mistral      llama + a sliding window on every layer
    gemma2       llama with embeddings * sqrt(hidden), `(1 + w)` RMSNorm, norms before and after
                 attention and MLP, GELU-tanh gates, scores scaled by query_pre_attn_scalar^-1/2,
                 attention- and final-logit soft-capping `cap * tanh(x / cap)`, sliding-window
                 and global layers alternating
    gemma3_text  gemma2 without attention soft-capping, plus q/k norms and a separate RoPE base
                 (`rope_local_theta`) on the sliding-window layers

Attention span per layer: `layer_types[i]` is "full_attention" or "sliding_attention"; a
sliding layer with window W lets the query at position p see the keys at positions q with
`p - W < q <= p` (Beltagy et al. 2020, arXiv:2004.05150; the convention of transformers).

`from_hf_config` / `to_hf_config` translate to and from a Hugging Face `config.json`
dictionary (both the transformers 4 `rope_theta`/`rope_scaling` keys and the transformers 5
`rope_parameters` key are read; both are written), family by family in
`rlhf_jax.models.hf_config`. Settings a family's config.json cannot express, or that
transformers would ignore, are refused with a ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from rlhf_jax.ops.checks import check_in

MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "plain", "blockwise")

_PLAIN = dict(qk_norm=False, norm_scale_offset=0.0, scale_embeddings=False, sandwich_norms=False)
_GEMMA = dict(qk_norm=False, norm_scale_offset=1.0, scale_embeddings=True, sandwich_norms=True)
# The fixed layout flags of each family: from_hf_config sets them, to_hf_config checks them.
FAMILY_LAYOUT = {
    "gpt2": _PLAIN, "llama": _PLAIN, "qwen2": _PLAIN, "mistral": _PLAIN,
    "qwen3": {**_PLAIN, "qk_norm": True},
    "gemma2": _GEMMA,
    "gemma3_text": {**_GEMMA, "qk_norm": True},
}
class RopeSettings(NamedTuple):
    """One rotary embedding: base `theta` and its scaling (see layers.rope_inverse_frequencies)."""

    theta: float
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def alternating_layer_types(num_layers: int, period: int) -> tuple[str, ...]:
    """Every `period`-th layer (1-based) full attention, the others sliding (Gemma's pattern)."""
    return tuple(
        FULL_ATTENTION if (i + 1) % period == 0 else SLIDING_ATTENTION for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer (defaults: a Llama layout)."""

    model_type: str = "llama"  # Hugging Face model_type, one of MODEL_TYPES
    vocab_size: int = 32000
    hidden_size: int = 4096  # d_model
    num_layers: int = 32
    num_heads: int = 32  # query heads
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads
    intermediate_size: int = 11008  # MLP width
    max_position_embeddings: int = 2048  # a hard limit only for learned positions (GPT-2)
    # --- layer layout ---
    norm_type: str = "rmsnorm"  # "rmsnorm" (Llama) | "layernorm" (GPT-2)
    norm_eps: float = 1e-6
    activation: str = "silu"  # MLP non-linearity, Hugging Face names (gelu_new = tanh approx.)
    gated_mlp: bool = True  # SwiGLU: down(act(gate(x)) * up(x)); False: fc_out(act(fc_in(x)))
    position_embedding: str = "rope"  # "rope" | "learned"
    fused_qkv: bool = False  # one [D, (H + 2 KV) * head_dim] projection (GPT-2's c_attn)
    qkv_bias: bool = False  # bias on the q/k/v projections (GPT-2, Qwen2)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # bias on the MLP projections (GPT-2)
    tie_word_embeddings: bool = False  # logits = hidden @ embedding.T
    # --- Qwen3 / Gemma additions ---
    qk_norm: bool = False  # RMSNorm over head_dim of each query and key head, before RoPE
    norm_scale_offset: float = 0.0  # RMSNorm multiplies by (offset + scale); Gemma: 1
    scale_embeddings: bool = False  # token embeddings * sqrt(hidden_size), in the compute dtype
    sandwich_norms: bool = False  # also norm the attention and MLP outputs before each residual add
    query_pre_attn_scalar: float | None = None  # scores scaled by scalar**-0.5; None: head_dim
    attn_logit_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # vocabulary logits -> cap * tanh(logits / cap)
    # --- attention span per layer ---
    sliding_window: int | None = None  # W: position p attends to positions (p - W, p]
    layer_types: tuple[str, ...] | None = None  # "full_attention" | "sliding_attention" per layer;
    # None: every layer full, or every layer sliding when sliding_window is set (Mistral)
    # --- rotary position embedding (Su et al. 2021, arXiv:2104.09864) ---
    rope_theta: float = 10000.0  # base wavelength
    rope_type: str = "default"  # "default" | "linear" (positions / factor) | "llama3"
    rope_factor: float = 1.0  # scaling factor of "linear" and "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_position_embeddings: int = 8192  # "llama3" only
    rope_local_theta: float | None = None  # base of the sliding layers' (unscaled) RoPE; None: same
    # RoPE as the full layers (Gemma 3's rope_local_base_freq)
    # --- special tokens (kept for config.json round trips) ---
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # --- numerics ---
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators); logits stay float32
    param_dtype: str = "float32"  # storage dtype of the parameters
    remat: bool = False  # rematerialise each block in the backward pass (nn.remat)
    # Attention implementation (models/layers.py, `Attention`): "plain" materialises the
    # [B, H, T, S] scores; "blockwise" runs ops.blockwise_attention (blocks of
    # attention_block_size queries x keys, memory linear in T); "auto" uses blockwise when
    # T > 1 and T * S > attention_block_size**2 (so decode steps and short sequences stay plain).
    # In a pipeline stage config: `model.attention_impl` / `policy.attention_impl`.
    attention_impl: str = "auto"
    attention_block_size: int = 512

    def __post_init__(self):
        check_in(self.model_type, MODEL_TYPES, "model_type")
        check_in(self.norm_type, ("rmsnorm", "layernorm"), "norm_type")
        check_in(self.activation, ACTIVATIONS, "activation")
        check_in(self.position_embedding, ("rope", "learned"), "position_embedding")
        check_in(self.dtype, DTYPES, "dtype")
        check_in(self.param_dtype, DTYPES, "param_dtype")
        check_in(self.attention_impl, ATTENTION_IMPLS, "attention_impl")
        if not isinstance(self.attention_block_size, int) or self.attention_block_size <= 0:
            raise ValueError(f"`attention_block_size` must be a positive int, got {self.attention_block_size!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported; supported types are "
                f"{list(ROPE_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_heads` "
                f"({self.num_heads}) unless `head_dim` is given"
            )
        if self.head_dim is not None and self.head_dim * self.num_heads == self.hidden_size:
            object.__setattr__(self, "head_dim", None)  # the default, so equal configs compare equal
        if self.num_kv_heads == self.num_heads:
            object.__setattr__(self, "num_kv_heads", None)  # likewise
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` ({self.kv_heads})"
            )
        if self.position_embedding == "rope" and self.dims_per_head % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.dims_per_head}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._check_layer_types()
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                     "rope_local_theta"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0 or None, got {getattr(self, name)}")
        if (self.qk_norm or self.rope_local_theta is not None) and self.position_embedding != "rope":
            raise ValueError("`qk_norm` and `rope_local_theta` need rotary position embeddings")

    def _check_layer_types(self):
        """Resolve `layer_types` to a tuple (None when every layer is full) and validate it."""
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"`sliding_window` must be > 0 or None, got {self.sliding_window}")
        types = self.layer_types
        if types is None and self.sliding_window is not None:
            types = (SLIDING_ATTENTION,) * self.num_layers
        if types is not None:
            types = tuple(types)
            if len(types) != self.num_layers:
                raise ValueError(
                    f"`layer_types` has {len(types)} entries but the model has {self.num_layers} layers"
                )
            for layer_type in types:
                check_in(layer_type, LAYER_TYPES, "layer_types")
            if SLIDING_ATTENTION in types and self.sliding_window is None:
                raise ValueError("`layer_types` has sliding_attention layers but `sliding_window` is None")
            if self.sliding_window is None:
                types = None  # all full attention
        object.__setattr__(self, "layer_types", types)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dims_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    def uses_blockwise_attention(self, queries: int, keys: int) -> bool:
        """Whether attention over `queries` x `keys` runs blockwise (see `attention_impl`)."""
        if self.attention_impl == "auto":
            return queries > 1 and queries * keys > self.attention_block_size ** 2
        return self.attention_impl == "blockwise"

    def layer_type(self, layer: int) -> str:
        """"full_attention" or "sliding_attention" for layer number `layer`."""
        return FULL_ATTENTION if self.layer_types is None else self.layer_types[layer]

    def rope(self, layer_type: str = FULL_ATTENTION) -> "RopeSettings":
        """The rotary embedding of the layers of `layer_type`."""
        if layer_type == SLIDING_ATTENTION and self.rope_local_theta is not None:
            return RopeSettings(theta=self.rope_local_theta)
        return RopeSettings(
            theta=self.rope_theta, type=self.rope_type, factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
            original_max_position_embeddings=self.rope_original_max_position_embeddings,
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # Family presets ------------------------------------------------------------------------
    @classmethod
    def gpt2(cls, **fields) -> "ModelConfig":
        """GPT-2 layout: learned positions, LayerNorm, GELU (tanh), fused biased QKV, tied."""
        base = dict(
            model_type="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
            intermediate_size=3072, max_position_embeddings=1024, norm_type="layernorm",
            norm_eps=1e-5, activation="gelu_new", gated_mlp=False, position_embedding="learned",
            fused_qkv=True, qkv_bias=True, attn_out_bias=True, mlp_bias=True,
            tie_word_embeddings=True,
        )
        return cls(**{**base, **fields})

    @classmethod
    def llama(cls, **fields) -> "ModelConfig":
        """Llama layout: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases."""
        return cls(**{"model_type": "llama", **fields})

    @classmethod
    def qwen2(cls, **fields) -> "ModelConfig":
        """Qwen2 layout: the Llama layout plus biases on the q/k/v projections."""
        base = dict(model_type="qwen2", qkv_bias=True, rope_theta=1e6, max_position_embeddings=32768)
        return cls(**{**base, **fields})

    @classmethod
    def qwen3(cls, **fields) -> "ModelConfig":
        """Qwen3 layout: the Llama layout plus per-head q/k RMSNorm; head_dim 128 (Qwen3-8B sizes)."""
        base = dict(
            model_type="qwen3", vocab_size=151936, num_layers=36, num_kv_heads=8, head_dim=128,
            intermediate_size=12288, rope_theta=1e6, max_position_embeddings=40960,
            **FAMILY_LAYOUT["qwen3"],
        )
        return cls(**{**base, **fields})

    @classmethod
    def mistral(cls, **fields) -> "ModelConfig":
        """Mistral layout: the Llama layout with a 4096-token sliding window on every layer."""
        base = dict(
            model_type="mistral", num_kv_heads=8, intermediate_size=14336, sliding_window=4096,
            max_position_embeddings=32768, bos_token_id=1, eos_token_id=2,
        )
        return cls(**{**base, **fields})

    @classmethod
    def gemma2(cls, **fields) -> "ModelConfig":
        """Gemma 2 layout (2B sizes): see the module docstring; even layers slide, odd are global."""
        num_layers = fields.get("num_layers", 26)
        base = dict(
            model_type="gemma2", vocab_size=256000, hidden_size=2304, num_layers=num_layers,
            num_heads=8, num_kv_heads=4, head_dim=256, intermediate_size=9216,
            max_position_embeddings=8192, activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            query_pre_attn_scalar=256, attn_logit_softcap=50.0, final_logit_softcap=30.0,
            sliding_window=4096, layer_types=alternating_layer_types(num_layers, 2),
            bos_token_id=2, eos_token_id=1, pad_token_id=0, **FAMILY_LAYOUT["gemma2"],
        )
        return cls(**{**base, **fields})

    @classmethod
    def gemma3_text(cls, **fields) -> "ModelConfig":
        """Gemma 3 text layout (transformers' default sizes): five sliding layers with RoPE base
        10^4, then a global one with base 10^6; q/k norms; no attention soft-capping."""
        num_layers = fields.get("num_layers", 26)
        base = dict(
            model_type="gemma3_text", vocab_size=262208, hidden_size=2304, num_layers=num_layers,
            num_heads=8, num_kv_heads=4, head_dim=256, intermediate_size=9216,
            max_position_embeddings=131072, activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            query_pre_attn_scalar=256, sliding_window=4096,
            layer_types=alternating_layer_types(num_layers, 6), rope_theta=1e6,
            rope_local_theta=1e4, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            **FAMILY_LAYOUT["gemma3_text"],
        )
        return cls(**{**base, **fields})

    # Hugging Face translation (tables in rlhf_jax.models.hf_config) -------------------------
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **fields) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; `fields` override (e.g. dtype, remat).

        Raises ValueError naming the key of a setting that is not supported.
        """
        from rlhf_jax.models.hf_config import fields_from_hf  # it imports this module

        return cls(**{**fields_from_hf(hf), **fields})

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields of this architecture (no `architectures`).

        Raises ValueError naming the field when the family's config.json cannot express it.
        """
        from rlhf_jax.models.hf_config import hf_config_dict

        return hf_config_dict(self)
