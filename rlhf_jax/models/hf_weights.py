"""Hugging Face tensor names <-> our parameter paths, as declarative tables.

Each row reads: Hugging Face name pattern, our parameter path, whether the tensor is
transposed (torch `nn.Linear` stores [out, in]; our kernels are [in, out]; GPT-2's `Conv1D`
already stores [in, out]) and the config flag that must be true for the row to exist.
`{i}` stands for the layer number. One table serves Llama, Qwen2/3, Mistral and Gemma 2/3:
Gemma's `post_attention_layernorm` norms the attention output (our `post_attn_norm`), where
in Llama it is the pre-MLP norm (our `mlp_norm`; Gemma's `pre_feedforward_layernorm`). Every tensor is checked by name and shape in both
directions, and errors name the offending tensor.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.errors import ModelError

# (hf name, our path, transpose, required config flag or None)
LLAMA_BACKBONE = (
    ("model.embed_tokens.weight", "decoder/embed/embedding", False, None),
    ("model.norm.weight", "decoder/final_norm/scale", False, None),
)
LLAMA_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", "decoder/layers_{i}/attn_norm/scale", False, None),
    ("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers_{i}/attn/q_proj/kernel", True, None),
    ("model.layers.{i}.self_attn.q_proj.bias", "decoder/layers_{i}/attn/q_proj/bias", False, "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "decoder/layers_{i}/attn/k_proj/kernel", True, None),
    ("model.layers.{i}.self_attn.k_proj.bias", "decoder/layers_{i}/attn/k_proj/bias", False, "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "decoder/layers_{i}/attn/v_proj/kernel", True, None),
    ("model.layers.{i}.self_attn.v_proj.bias", "decoder/layers_{i}/attn/v_proj/bias", False, "qkv_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder/layers_{i}/attn/o_proj/kernel", True, None),
    ("model.layers.{i}.self_attn.o_proj.bias", "decoder/layers_{i}/attn/o_proj/bias", False, "attn_out_bias"),
    ("model.layers.{i}.self_attn.q_norm.weight", "decoder/layers_{i}/attn/q_norm/scale", False, "qk_norm"),
    ("model.layers.{i}.self_attn.k_norm.weight", "decoder/layers_{i}/attn/k_norm/scale", False, "qk_norm"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder/layers_{i}/mlp_norm/scale", False, "pre_norms"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder/layers_{i}/post_attn_norm/scale", False, "sandwich_norms"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "decoder/layers_{i}/mlp_norm/scale", False, "sandwich_norms"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "decoder/layers_{i}/post_mlp_norm/scale", False, "sandwich_norms"),
    ("model.layers.{i}.mlp.gate_proj.weight", "decoder/layers_{i}/mlp/gate_proj/kernel", True, None),
    ("model.layers.{i}.mlp.gate_proj.bias", "decoder/layers_{i}/mlp/gate_proj/bias", False, "mlp_bias"),
    ("model.layers.{i}.mlp.up_proj.weight", "decoder/layers_{i}/mlp/up_proj/kernel", True, None),
    ("model.layers.{i}.mlp.up_proj.bias", "decoder/layers_{i}/mlp/up_proj/bias", False, "mlp_bias"),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder/layers_{i}/mlp/down_proj/kernel", True, None),
    ("model.layers.{i}.mlp.down_proj.bias", "decoder/layers_{i}/mlp/down_proj/bias", False, "mlp_bias"),
)
GPT2_BACKBONE = (
    ("transformer.wte.weight", "decoder/embed/embedding", False, None),
    ("transformer.wpe.weight", "decoder/position_embed/embedding", False, None),
    ("transformer.ln_f.weight", "decoder/final_norm/scale", False, None),
    ("transformer.ln_f.bias", "decoder/final_norm/bias", False, None),
)
GPT2_LAYER = (
    ("transformer.h.{i}.ln_1.weight", "decoder/layers_{i}/attn_norm/scale", False, None),
    ("transformer.h.{i}.ln_1.bias", "decoder/layers_{i}/attn_norm/bias", False, None),
    ("transformer.h.{i}.attn.c_attn.weight", "decoder/layers_{i}/attn/qkv_proj/kernel", False, None),
    ("transformer.h.{i}.attn.c_attn.bias", "decoder/layers_{i}/attn/qkv_proj/bias", False, None),
    ("transformer.h.{i}.attn.c_proj.weight", "decoder/layers_{i}/attn/o_proj/kernel", False, None),
    ("transformer.h.{i}.attn.c_proj.bias", "decoder/layers_{i}/attn/o_proj/bias", False, None),
    ("transformer.h.{i}.ln_2.weight", "decoder/layers_{i}/mlp_norm/scale", False, None),
    ("transformer.h.{i}.ln_2.bias", "decoder/layers_{i}/mlp_norm/bias", False, None),
    ("transformer.h.{i}.mlp.c_fc.weight", "decoder/layers_{i}/mlp/fc_in/kernel", False, None),
    ("transformer.h.{i}.mlp.c_fc.bias", "decoder/layers_{i}/mlp/fc_in/bias", False, None),
    ("transformer.h.{i}.mlp.c_proj.weight", "decoder/layers_{i}/mlp/fc_out/kernel", False, None),
    ("transformer.h.{i}.mlp.c_proj.bias", "decoder/layers_{i}/mlp/fc_out/bias", False, None),
)
LM_HEAD = (("lm_head.weight", "lm_head/kernel", True, "untied"),)
SCORE_HEAD = (
    ("score.weight", "score/kernel", True, None),
    # Hugging Face score heads have no bias; ours is written only to keep a trained bias.
    ("score.bias", "score/bias", False, "optional"),
)
# Tensors that old checkpoints carry but no parameter needs (attention-mask and rotary buffers).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class WeightRule(NamedTuple):
    hf_name: str
    param_path: str
    transpose: bool
    optional: bool  # may be absent from a checkpoint (our parameter keeps its init value)


def weight_rules(config: ModelConfig, head: str) -> list[WeightRule]:
    """The expanded table for `config` with `head` in "lm" | "score" | "none"."""
    if config.model_type == "gpt2":
        backbone, layer = GPT2_BACKBONE, GPT2_LAYER
    else:
        backbone, layer = LLAMA_BACKBONE, LLAMA_LAYER
    head_rows = {"lm": LM_HEAD, "score": SCORE_HEAD, "none": ()}[head]
    flags = {
        "qkv_bias": config.qkv_bias, "attn_out_bias": config.attn_out_bias,
        "mlp_bias": config.mlp_bias, "untied": not config.tie_word_embeddings, "optional": True,
        "qk_norm": config.qk_norm, "sandwich_norms": config.sandwich_norms,
        "pre_norms": not config.sandwich_norms,
    }
    rules = []
    for rows, layers in ((backbone, [None]), (layer, range(config.num_layers)), (head_rows, [None])):
        for i in layers:
            for hf_name, path, transpose, flag in rows:
                if flag is not None and not flags[flag]:
                    continue
                fmt = {"i": i} if i is not None else {}
                rules.append(WeightRule(
                    hf_name.format(**fmt), path.format(**fmt), transpose, flag == "optional"
                ))
    return rules


def _get(tree, path):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree, path, value):
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _flat_paths(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flat_paths(value, path + "/")
        else:
            yield path


def hf_to_params(tensors: Mapping[str, np.ndarray], config: ModelConfig, head: str,
                 expected_shapes: Mapping, *, source: str = "checkpoint") -> dict:
    """Map Hugging Face tensors to our nested params, cast to `config.param_dtype`.

    `expected_shapes` is our parameter tree of shapes (e.g. from `jax.eval_shape(init)`).
    Raises `ModelError(source, ...)` naming a missing tensor, a tensor of the wrong shape, or
    an unexpected tensor. Optional rows absent from `tensors` are left out of the result.
    """
    rules = weight_rules(config, head)
    used = {rule.hf_name for rule in rules}
    ignorable = {"lm_head.weight"} if head != "lm" or config.tie_word_embeddings else set()
    if head != "score":
        ignorable |= {"score.weight", "score.bias"}
    unexpected = [
        name for name in tensors
        if name not in used and name not in ignorable and not name.endswith(IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise ModelError(
            source, f"unexpected tensor {unexpected[0]!r} for a {config.model_type} model with "
            f"{config.num_layers} layers ({len(unexpected)} unexpected in all: {unexpected[:5]})"
        )
    params: dict = {}
    for rule in rules:
        if rule.hf_name not in tensors:
            if rule.optional:
                continue
            raise ModelError(source, f"missing tensor {rule.hf_name!r} (for parameter {rule.param_path})")
        array = np.asarray(tensors[rule.hf_name])
        expected = tuple(_get(expected_shapes, rule.param_path))
        want = expected[::-1] if rule.transpose else expected
        if tuple(array.shape) != want:
            raise ModelError(
                source, f"tensor {rule.hf_name!r} has shape {tuple(array.shape)} but the config "
                f"expects {want} (for parameter {rule.param_path})"
            )
        value = array.T if rule.transpose else array
        dtype = np.float32 if rule.param_path.startswith("score/") else jnp.dtype(config.param_dtype)
        _set(params, rule.param_path, np.ascontiguousarray(value).astype(dtype))
    return params


def params_to_hf(params: Mapping, config: ModelConfig, head: str, dtype) -> dict[str, np.ndarray]:
    """Our params -> {Hugging Face name: array in `dtype`}; every parameter must be mapped."""
    rules = weight_rules(config, head)
    covered = {rule.param_path for rule in rules}
    leftover = [path for path in _flat_paths(params) if path not in covered]
    if leftover:
        raise ValueError(
            f"parameter {leftover[0]!r} has no Hugging Face name for a {config.model_type} model"
        )
    tensors = {}
    for rule in rules:
        try:
            value = np.asarray(_get(params, rule.param_path), dtype=np.float32)
        except KeyError:
            raise ValueError(f"params lack {rule.param_path!r} (written as {rule.hf_name!r})") from None
        if rule.optional and not np.any(value):
            continue  # a zero score bias is what Hugging Face assumes; leave it out
        tensors[rule.hf_name] = np.ascontiguousarray(value.T if rule.transpose else value).astype(dtype)
    return tensors
