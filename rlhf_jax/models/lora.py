"""LoRA: low-rank adapters on the linear layers of a frozen model (Hu et al. 2021, arXiv:2106.09685).

For a targeted linear layer `y = x @ W + b` (W [in, out], frozen) the adapted layer is

    y = x @ W + b + (alpha / r) * (dropout(x) @ A) @ B,    A [in, r], B [r, out]

with `A ~ U(-1/sqrt(in), 1/sqrt(in))` (the Kaiming-uniform bound PEFT uses) and `B = 0`, so
a fresh adapter leaves the model unchanged. Merging gives the same function without dropout:
`W' = W + (alpha / r) * A @ B` (`merge_adapters`).

Design. The model code is untouched: `LoRAModel.apply` runs the base module under a Flax
method interceptor (`flax.linen.intercept_methods`) that adds the low-rank term to the output of
every targeted `Dense`. Compared with merging the adapters into the kernels inside the forward
pass, this

- keeps no merged copy of any kernel: the backward pass needs only `x` and `x @ A` besides the
  frozen kernel, where a merged kernel would be a residual of every adapted layer (a second
  copy of the targeted weights in activation memory);
- applies dropout exactly as the paper and PEFT do: on the adapter's input only;
- works for every entry point of the model (`__call__`, `hidden_states`, `lm_logits`,
  `shared_prefix_hidden_states`, the KV-cache prefill and decode steps).

Parameters: `LoRAModel.apply({"params": {"base": base, "lora": adapters, "modules": m}}, ...)`.
`base` is the frozen model's parameter tree; `adapters` mirrors its module paths, e.g.
`adapters["decoder"]["layers_0"]["attn"]["q_proj"] = {"lora_a": A, "lora_b": B}`; `modules`
(optional) holds top-level subtrees that replace the base's and are trained in full, like
PEFT's `modules_to_save` (a reward model's fresh `score` head). An empty adapter tree
(`{"lora": {}}`) is the base model itself: the frozen reference policy is the base with its
adapters disabled, with no second copy of the weights. Dropout is active only when
`dropout_rng` is given (training); evaluation, reference scoring and sampling pass none.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.layers import Dense, fold_matmul

# Linear layers the models have (`rlhf_jax.models.layers`): Llama/Qwen/Mistral-style separate
# projections, GPT-2's fused `qkv_proj` and `fc_in`/`fc_out`.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                "down_proj", "fc_in", "fc_out")
# The default adapts every linear layer of the blocks that the model has (PEFT's "all-linear",
# the LM head excepted): adapters on the attention projections alone fell short of full
# fine-tuning in QLoRA (Dettmers et al. 2023, arXiv:2305.14314) and, on the quick start's DPO,
# ended with a lower held-out accuracy and pass@1 than all-linear adapters of a similar size
# (benchmarks/RESULTS.md, "LoRA DPO").
DEFAULT_TARGETS = LORA_TARGETS


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank `r`, scale `alpha / r`, dropout on the adapter input, and the targeted layer names."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        check_lora_settings(self.rank, self.alpha, self.dropout, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_lora_settings(rank, alpha, dropout, targets, prefix: str = "") -> None:
    """ValueError naming the key (`prefix` + name) for an invalid LoRA setting."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`{prefix}rank` must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"`{prefix}alpha` must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`{prefix}dropout` must be in [0, 1), got {dropout!r}")
    if not targets:
        raise ValueError(f"`{prefix}targets` must name at least one layer; valid: {', '.join(LORA_TARGETS)}")
    unknown = [name for name in targets if name not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"`{prefix}targets`: unknown layer {unknown[0]!r}; valid layers: {', '.join(LORA_TARGETS)}")


def _adapted_layers(params, targets, prefix=()):
    """Module paths (tuples) of the targeted layers in `params`: nodes named in `targets` that
    hold a 2-D `kernel`."""
    for name, node in params.items():
        if not isinstance(node, Mapping):
            continue
        path = prefix + (name,)
        if name in targets and "kernel" in node and jnp.ndim(node["kernel"]) == 2:
            yield path
        else:
            yield from _adapted_layers(node, targets, path)


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path):
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def adapter_layers(adapters, prefix=()) -> list[tuple[str, ...]]:
    """Module paths of the layers an adapter tree adapts (nodes holding `lora_a`)."""
    found = []
    for name, node in adapters.items():
        if isinstance(node, Mapping):
            if "lora_a" in node:
                found.append(prefix + (name,))
            else:
                found.extend(adapter_layers(node, prefix + (name,)))
    return found


def init_adapters(base_params, config: LoRAConfig, rng) -> dict:
    """Fresh adapters for every targeted layer of `base_params`: A [in, r] uniform in
    +-1/sqrt(in), B [r, out] zeros (float32). Target names the model lacks are skipped;
    raises ValueError when no layer is targeted."""
    layers = list(_adapted_layers(base_params, set(config.targets)))
    if not layers:
        raise ValueError(f"no layer of the model matches LoRA targets {list(config.targets)}")
    adapters: dict = {}
    for index, path in enumerate(layers):
        fan_in, fan_out = jnp.shape(_get(base_params, path)["kernel"])
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, index), (fan_in, config.rank), jnp.float32, -bound, bound)
        _set(adapters, path, {"lora_a": a, "lora_b": jnp.zeros((config.rank, fan_out), jnp.float32)})
    return adapters


def adapter_delta(x, lora_a, lora_b, scale: float, dtype):
    """`scale * (x @ A) @ B` in `dtype` for x [..., in]."""
    hidden = fold_matmul(x.astype(dtype), lora_a.astype(dtype))
    return (scale * fold_matmul(hidden, lora_b.astype(dtype))).astype(dtype)


def _layer_key(rng, path) -> jax.Array:
    return jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


def lora_interceptor(adapters, scale: float, dropout: float = 0.0, dropout_rng=None):
    """A `flax.linen.intercept_methods` interceptor adding the adapter term to targeted `Dense`s."""

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, Dense):
            return out
        node = _get(adapters, context.module.path)
        if node is None or "lora_a" not in node:
            return out
        x = args[0]
        if dropout > 0 and dropout_rng is not None:
            keep = jax.random.bernoulli(_layer_key(dropout_rng, context.module.path), 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        return out + adapter_delta(x, node["lora_a"], node["lora_b"], scale, out.dtype)

    return intercept


def full_module_params(params) -> dict:
    """The base tree with the fully trained `modules` subtrees put in place."""
    return {**params["base"], **params.get("modules", {})}


@dataclasses.dataclass(frozen=True)
class LoRAModel:
    """A Flax model (`CausalLM`, `RewardModel`, `ValueModel`) with LoRA adapters (module doc).

    `apply` takes the module's own call conventions (`method=`, caches, ...); `config` is the
    wrapped module's `ModelConfig`, so code that reads `module.config` (generation) works.
    """

    module: nn.Module
    lora: LoRAConfig

    @property
    def config(self):
        return self.module.config

    def apply(self, variables, *args, dropout_rng=None, **kwargs):
        params = variables["params"]
        intercept = lora_interceptor(params.get("lora", {}), self.lora.scale, self.lora.dropout, dropout_rng)
        with nn.intercept_methods(intercept):
            return self.module.apply({"params": full_module_params(params)}, *args, **kwargs)


def merge_adapters(params, scale: float) -> dict:
    """Plain parameters of the adapted model: every adapted kernel `W + scale * A @ B`
    (computed in float32, stored in W's dtype), the `modules` subtrees in place."""
    merged = jax.tree.map(lambda x: x, full_module_params(params))
    for path in adapter_layers(params.get("lora", {})):
        node = _get(params["lora"], path)
        layer = dict(_get(merged, path))
        kernel = layer["kernel"]
        delta = scale * jnp.asarray(node["lora_a"], jnp.float32) @ jnp.asarray(node["lora_b"], jnp.float32)
        layer["kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(jnp.asarray(kernel).dtype)
        _set(merged, path, layer)
    return merged


def split_modules(params, names) -> tuple[dict, dict]:
    """`(base without names, {name: subtree})`: top-level subtrees to train in full."""
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"the model has no top-level module {missing[0]!r} (has {sorted(params)})")
    return ({key: value for key, value in params.items() if key not in names},
            {name: params[name] for name in names})


__all__ = [
    "LORA_TARGETS", "DEFAULT_TARGETS", "LoRAConfig", "check_lora_settings", "adapter_layers", "init_adapters",
    "adapter_delta", "lora_interceptor", "full_module_params", "LoRAModel", "merge_adapters", "split_modules",
]
