"""One configuration for every decoder-only model here: GPT-2 and the Llama / Qwen2 family.

`ModelConfig` is a frozen (hashable) dataclass, so a module built from it can be a static
argument of `jax.jit`. The family presets (`ModelConfig.gpt2`, `.llama`, `.qwen2`) fill the
fields that differ between families; `from_hf_config` / `to_hf_config` translate to and from
a Hugging Face `config.json` dictionary (both the transformers 4 `rope_theta`/`rope_scaling`
keys and the transformers 5 `rope_parameters` key are read; both are written).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rlhf_jax.ops.checks import check_in

MODEL_TYPES = ("gpt2", "llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder-only transformer (defaults: a Llama layout)."""

    model_type: str = "llama"  # Hugging Face model_type: "gpt2" | "llama" | "qwen2"
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
    final_logit_softcap: float | None = None  # vocabulary logits -> cap * tanh(logits / cap) (Gemma 2)
    # --- rotary position embedding (Su et al. 2021, arXiv:2104.09864) ---
    rope_theta: float = 10000.0  # base wavelength
    rope_type: str = "default"  # "default" | "linear" (positions / factor) | "llama3"
    rope_factor: float = 1.0  # scaling factor of "linear" and "llama3"
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_position_embeddings: int = 8192  # "llama3" only
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
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"`num_heads` ({self.num_heads}) must be a multiple of `num_kv_heads` ({self.kv_heads})"
            )
        if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
            raise ValueError(f"`final_logit_softcap` must be > 0 or None, got {self.final_logit_softcap}")
        if self.position_embedding == "rope" and self.dims_per_head % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.dims_per_head}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    # Derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dims_per_head(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

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

    # Hugging Face translation --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **fields) -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; `fields` override (e.g. dtype, remat)."""
        model_type = hf.get("model_type")
        if model_type == "gpt2":
            parsed = _gpt2_from_hf(hf)
        elif model_type in ("llama", "qwen2"):
            parsed = _llama_from_hf(hf)
        else:
            raise ValueError(
                f"config.json model_type {model_type!r} is not supported; supported: {list(MODEL_TYPES)}"
            )
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = hf.get(key)
            parsed[key] = tuple(value) if isinstance(value, list) else value
        return cls(**{**parsed, **fields})

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` fields of this architecture (no `architectures`)."""
        out = _gpt2_to_hf(self) if self.model_type == "gpt2" else _llama_to_hf(self)
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


def _rope_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Read RoPE settings from `rope_parameters` (transformers 5) or `rope_scaling` (4)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json: rope scaling type {rope_type!r} is not supported; supported types are "
            f"{list(ROPE_TYPES)}"
        )
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    out = dict(rope_theta=float(theta), rope_type=rope_type)
    if rope_type != "default":
        out["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        out.update(
            rope_low_freq_factor=float(merged["low_freq_factor"]),
            rope_high_freq_factor=float(merged["high_freq_factor"]),
            rope_original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
        )
    return out


def _llama_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    model_type = hf["model_type"]
    if model_type == "qwen2" and hf.get("use_sliding_window", False):
        raise ValueError("config.json: Qwen2 sliding-window attention (use_sliding_window) is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None  # the default; keeps configs equal whether or not the key is written
    return dict(
        model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads"), head_dim=head_dim,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm_type="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), activation=hf.get("hidden_act", "silu"),
        gated_mlp=True, position_embedding="rope", fused_qkv=False,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        attn_out_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        **_rope_from_hf(hf),
    )


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    if config.model_type == "qwen2" and (not config.qkv_bias or config.attn_out_bias):
        raise ValueError("a qwen2 config must have qkv_bias=True and attn_out_bias=False")
    if config.model_type == "llama" and config.qkv_bias != config.attn_out_bias:
        raise ValueError("a llama config has one attention_bias flag: qkv_bias must equal attn_out_bias")
    rope: dict[str, Any] = {"rope_type": config.rope_type}
    if config.rope_type != "default":
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope.update(
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_position_embeddings,
        )
    out = dict(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
        head_dim=config.dims_per_head, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.norm_eps,
        hidden_act=config.activation, mlp_bias=config.mlp_bias, rope_theta=config.rope_theta,
        rope_scaling=None if config.rope_type == "default" else dict(rope),
        rope_parameters={**rope, "rope_theta": config.rope_theta},
        attention_dropout=0.0,
    )
    if config.model_type == "llama":
        out["attention_bias"] = config.qkv_bias
    else:
        out["use_sliding_window"] = False
    return out
