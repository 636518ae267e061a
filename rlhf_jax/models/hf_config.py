"""`ModelConfig` <-> Hugging Face `config.json`, family by family.

Reading follows each transformers model class: defaults for absent keys, where
`sliding_window` and `layer_types` live (Mistral: one window for every layer; Qwen3:
`use_sliding_window` + `max_window_layers` or `layer_types`; Gemma 2/3: `layer_types`, else
every 2nd / `sliding_window_pattern`-th layer global), Gemma 3's RoPE per layer type
(`rope_parameters.{full,sliding}_attention`, or transformers 4's `rope_theta` + `rope_scaling`
+ `rope_local_base_freq`). Keys a family does not have, or that transformers would ignore,
must be absent or null (`_REFUSED_KEYS`); writing refuses fields the family cannot express.
Errors name the key.
"""
from __future__ import annotations

from typing import Any, Mapping

from rlhf_jax.models.config import (
    FAMILY_LAYOUT, FULL_ATTENTION, MODEL_TYPES, ROPE_TYPES, SLIDING_ATTENTION, ModelConfig,
    RopeSettings, alternating_layer_types,
)

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


def fields_from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`ModelConfig` fields from a Hugging Face `config.json` dict."""
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
    return parsed


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` fields of `config` (no `architectures`); refuses what the family
    cannot express, naming the field."""
    _check_expressible(config)
    out = _gpt2_to_hf(config) if config.model_type == "gpt2" else _rope_family_to_hf(config)
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
    out.update(
        model_type=config.model_type, vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=eos, pad_token_id=config.pad_token_id,
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
