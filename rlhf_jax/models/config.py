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
`rope_parameters` key are read; both are written). Settings a family's config.json cannot
express, or that transformers would ignore, are refused with a ValueError naming the key.
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

_PLAIN = dict(qk_norm=False, norm_scale_offset=0.0, scale_embeddings=False, sandwich_norms=False)
_GEMMA = dict(qk_norm=False, norm_scale_offset=1.0, scale_embeddings=True, sandwich_norms=True)
# The fixed layout flags of each family: from_hf_config sets them, to_hf_config checks them.
FAMILY_LAYOUT = {
    "gpt2": _PLAIN, "llama": _PLAIN, "qwen2": _PLAIN, "mistral": _PLAIN,
    "qwen3": {**_PLAIN, "qk_norm": True},
    "gemma2": _GEMMA,
    "gemma3_text": {**_GEMMA, "qk_norm": True},
}
# The optional settings each family's config.json can carry; the others must stay None.
OPTIONAL_SETTINGS = (
    "sliding_window", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
    "rope_local_theta",
)
FAMILY_OPTIONS = {
    "gpt2": (), "llama": (), "qwen2": (),
    "qwen3": ("sliding_window",),
    "mistral": ("sliding_window",),
    "gemma2": ("sliding_window", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"),
    "gemma3_text": ("sliding_window", "query_pre_attn_scalar", "final_logit_softcap", "rope_local_theta"),
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

    def __post_init__(self):
        check_in(self.model_type, MODEL_TYPES, "model_type")
        check_in(self.norm_type, ("rmsnorm", "layernorm"), "norm_type")
        check_in(self.activation, ACTIVATIONS, "activation")
        check_in(self.position_embedding, ("rope", "learned"), "position_embedding")
        check_in(self.dtype, DTYPES, "dtype")
        check_in(self.param_dtype, DTYPES, "param_dtype")
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

    # Hugging Face translation --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **fields) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; `fields` override (e.g. dtype, remat)."""
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            parsed = _gpt2_from_hf(hf)
        elif model_type in MODEL_TYPES:
            parsed = _rope_family_from_hf(hf)
        else:
            raise ValueError(
                f"config.json model_type {model_type!r} is not supported; supported: {list(MODEL_TYPES)}"
            )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = hf.get(key)
            parsed[key] = tuple(value) if isinstance(value, list) else value
        return cls(**{**parsed, **fields})

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields of this architecture (no `architectures`).

        Raises ValueError naming the field when the family's config.json cannot express it.
        """
        _check_expressible(self)
        out = _gpt2_to_hf(self) if self.model_type == "gpt2" else _rope_family_to_hf(self)
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out.update(
            model_type=self.model_type, vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=eos, pad_token_id=self.pad_token_id,
        )
        return out


def _gpt2_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "config.json: GPT-2 attention scaling other than 1/sqrt(head_dim) "
            "(scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true) is not supported"
        )
    hidden = hf["n_embd"]
    return dict(
        model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf["n_positions"], norm_type="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=hf.get("activation_function", "gelu_new"), gated_mlp=False,
        position_embedding="learned", fused_qkv=True, qkv_bias=True, attn_out_bias=True,
        mlp_bias=True, tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gpt2_to_hf(config: ModelConfig) -> dict[str, Any]:
    return dict(
        n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
        layer_norm_epsilon=config.norm_eps, activation_function=config.activation,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _rope_fields(rope: Mapping[str, Any], theta: float, key: str) -> dict[str, Any]:
    """Our rope_* fields from one Hugging Face rope dict (`key` names it in errors)."""
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json: {key} rope scaling type {rope_type!r} is not supported; supported "
            f"types are {list(ROPE_TYPES)}"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: {key} partial_rotary_factor != 1 is not supported")
    out = dict(rope_theta=float(rope.get("rope_theta", theta)), rope_type=rope_type)
    if rope_type != "default":
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
            rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    return out


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Read RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` (4).

    Gemma 3 keeps one rope dict per layer type (`rope_parameters.full_attention` /
    `.sliding_attention`; transformers 4: `rope_theta` + `rope_scaling` for the global layers
    and `rope_local_base_freq` for the sliding ones); its sliding layers' RoPE must be unscaled.
    """
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    if hf["model_type"] != "gemma3_text":
        return _rope_fields({**scaling, **params}, hf.get("rope_theta", 10000.0), "rope_parameters")
    if FULL_ATTENTION in params or SLIDING_ATTENTION in params:
        full, local = dict(params.get(FULL_ATTENTION) or {}), dict(params.get(SLIDING_ATTENTION) or {})
    else:
        full, local = {**scaling, **params}, {}
    out = _rope_fields(full, hf.get("rope_theta", 1e6), "rope_parameters.full_attention")
    key = "rope_parameters.sliding_attention"
    local_fields = _rope_fields(local, hf.get("rope_local_base_freq", 1e4), key)
    if local_fields["rope_type"] != "default":
        raise ValueError(
            f"config.json: {key} rope scaling type {local_fields['rope_type']!r} is not supported; "
            "the sliding layers' RoPE must be 'default'"
        )
    out["rope_local_theta"] = local_fields["rope_theta"]
    return out


# config.json keys that must be absent, null or false for a family (transformers would ignore
# them, or we do not implement them).
_REFUSED_KEYS = {
    "llama": ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"),
    "qwen2": ("use_sliding_window", "attn_logit_softcapping", "final_logit_softcapping"),
    "qwen3": ("attn_logit_softcapping", "final_logit_softcapping"),
    "mistral": ("attn_logit_softcapping", "final_logit_softcapping"),
    "gemma2": ("use_bidirectional_attention",),
    "gemma3_text": ("use_bidirectional_attention", "attn_logit_softcapping"),
}


def _attention_span_from_hf(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`sliding_window` and `layer_types` as each family's transformers model reads them."""
    num_layers = hf["num_hidden_layers"]
    written = hf.get("layer_types")
    if model_type == "mistral":  # one window for every layer; layer_types is not read
        window, types = hf.get("sliding_window", 4096), None
        expected = (SLIDING_ATTENTION if window else FULL_ATTENTION,) * num_layers
        if written is not None and tuple(written) != expected:
            raise ValueError(
                "config.json: layer_types is not supported for mistral (its sliding_window applies "
                "to every layer)"
            )
        return dict(sliding_window=window)
    if model_type == "qwen3":
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", 28)
        default = tuple(
            SLIDING_ATTENTION if window is not None and i >= first else FULL_ATTENTION
            for i in range(num_layers)
        )
    elif model_type in ("gemma2", "gemma3_text"):
        window = hf.get("sliding_window", 4096)
        period = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        default = alternating_layer_types(num_layers, period)
    else:  # llama, qwen2: full attention everywhere
        window, default = None, None
    types = default if written is None else tuple(written)
    if types is not None and SLIDING_ATTENTION in types and window is None:
        key = "use_sliding_window" if model_type == "qwen3" else "sliding_window"
        raise ValueError(f"config.json: layer_types has sliding_attention layers but {key} turns the window off")
    return dict(sliding_window=window, layer_types=types)


def _rope_family_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Llama, Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 text configs."""
    model_type = hf["model_type"]
    for key in _REFUSED_KEYS[model_type]:
        if hf.get(key):
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported for model_type {model_type!r}")
    gemma = model_type in ("gemma2", "gemma3_text")
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None  # the default; keeps configs equal whether or not the key is written
    activation = hf.get("hidden_activation", "gelu_pytorch_tanh") if gemma else hf.get("hidden_act", "silu")
    out = dict(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_type="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=activation,
        gated_mlp=True, position_embedding="rope", fused_qkv=False,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        attn_out_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        **FAMILY_LAYOUT[model_type], **_rope_from_hf(hf), **_attention_span_from_hf(hf, model_type),
    )
    if gemma:
        out.update(
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
            final_logit_softcap=hf.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
        )
    if model_type == "gemma2":
        out["attn_logit_softcap"] = hf.get("attn_logit_softcapping", 50.0)
    return out


def _check_expressible(config: ModelConfig) -> None:
    """Raise naming the first field that the family's config.json cannot express."""
    family = config.model_type
    for name, value in FAMILY_LAYOUT[family].items():
        if getattr(config, name) != value:
            raise ValueError(f"a {family} config must have {name}={value!r}, got {getattr(config, name)!r}")
    for name in OPTIONAL_SETTINGS:
        if name not in FAMILY_OPTIONS[family] and getattr(config, name) is not None:
            raise ValueError(f"a {family} config cannot set {name} (got {getattr(config, name)!r})")
    if family == "gpt2":
        return
    if family == "qwen2" and (not config.qkv_bias or config.attn_out_bias):
        raise ValueError("a qwen2 config must have qkv_bias=True and attn_out_bias=False")
    if family != "qwen2" and config.qkv_bias != config.attn_out_bias:
        raise ValueError(
            f"a {family} config has one attention_bias flag: qkv_bias must equal attn_out_bias"
        )
    if family == "mistral" and config.qkv_bias:
        raise ValueError("a mistral config cannot have attention biases (qkv_bias, attn_out_bias)")
    if family != "llama" and config.mlp_bias:
        raise ValueError(f"a {family} config cannot have mlp_bias=True")
    if family == "mistral" and config.layer_types is not None and len(set(config.layer_types)) > 1:
        raise ValueError("a mistral config applies sliding_window to every layer: layer_types must be uniform")


def _rope_dict(rope: RopeSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.type}
    if rope.type != "default":
        out["factor"] = rope.factor
    if rope.type == "llama3":
        out.update(
            low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return out


def _rope_family_to_hf(config: ModelConfig) -> dict[str, Any]:
    family = config.model_type
    gemma = family in ("gemma2", "gemma3_text")
    rope = config.rope(FULL_ATTENTION)
    scaling = _rope_dict(rope)
    out = dict(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
        head_dim=config.dims_per_head, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        rope_theta=rope.theta, rope_scaling=None if rope.type == "default" else dict(scaling),
        rope_parameters={**scaling, "rope_theta": rope.theta},
        attention_dropout=0.0,
    )
    out["hidden_activation" if gemma else "hidden_act"] = config.activation
    if family in ("llama", "qwen2"):
        out["mlp_bias"] = config.mlp_bias
    if family == "qwen2":
        out["use_sliding_window"] = False
    else:
        out["attention_bias"] = config.qkv_bias
    types = list(config.layer_types or [FULL_ATTENTION] * config.num_layers)
    if family == "mistral":
        out["sliding_window"] = config.sliding_window
    elif family == "qwen3":
        sliding = [i for i, t in enumerate(types) if t == SLIDING_ATTENTION]
        out.update(
            use_sliding_window=config.sliding_window is not None, sliding_window=config.sliding_window,
            max_window_layers=sliding[0] if sliding else config.num_layers, layer_types=types,
        )
    elif gemma:
        out.update(
            sliding_window=config.sliding_window, layer_types=types,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            use_bidirectional_attention=False,
        )
    if family == "gemma3_text":
        local = config.rope(SLIDING_ATTENTION)
        out.update(
            rope_local_base_freq=local.theta,
            rope_parameters={
                FULL_ATTENTION: {**scaling, "rope_theta": rope.theta},
                SLIDING_ATTENTION: {**_rope_dict(local), "rope_theta": local.theta},
            },
        )
    return out
