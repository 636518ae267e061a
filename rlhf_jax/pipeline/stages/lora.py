"""The `lora` section of a stage: LoRA train states, the reference, and the adapter export.

With `lora` set, a stage trains a `LoRATrainState` (`rlhf_jax.training.lora_state`): the model's
parameters become the frozen base, the trainable parameters are fresh adapters on the `targets`
layers (or those of the PEFT folder `lora.path`), plus the `score` head of a reward or value
model, trained in full. Without it, the stage trains all parameters (`stage_setup.make_state`).
The frozen base is not checkpointed: a resumed run re-reads it from `model.path` /
`policy.path` / `value` (or draws the fresh model from `seed` again) and checks its
fingerprint against the checkpoint's (`rlhf_jax.pipeline.frozen_base`).
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from rlhf_jax.models.lora import LoRAConfig, LoRAModel, adapter_layers, init_adapters, split_modules
from rlhf_jax.models.peft_io import load_peft_adapter
from rlhf_jax.models.transformer import CausalLM
from rlhf_jax.typed_config import ConfigError
from rlhf_jax.pipeline.stage_configs import LoRASection
from rlhf_jax.pipeline.stages import stage_setup
from rlhf_jax.training.lora_state import create_lora_train_state, disabled_adapters
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer


def _lookup(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _check_shapes(adapters, base, path: str) -> None:
    """Every loaded adapter fits its layer's kernel [in, out] (ConfigError naming the layer)."""
    for layer in adapter_layers(adapters):
        node, kernel = _lookup(adapters, layer), _lookup(base, layer + ("kernel",))
        got = (np.shape(node["lora_a"])[0], np.shape(node["lora_b"])[1])
        if kernel is None or np.shape(kernel) != got:
            have = "missing" if kernel is None else list(np.shape(kernel))
            raise ConfigError(f"`lora.path`: {path} adapts {'/'.join(layer)} as [{got[0]}, {got[1]}], "
                              f"but the model's layer is {have}")


def _check_coverage(adapters, base, config: LoRAConfig, path: str, rng) -> None:
    """The adapter covers every layer its targets name in this model (ConfigError otherwise:
    an adapter of a shallower model, or of another base, would train only some layers)."""
    expected = set(adapter_layers(jax.eval_shape(lambda key: init_adapters(base, config, key), rng)))
    missing = sorted(expected - set(adapter_layers(adapters)))
    if missing:
        shown = ", ".join("/".join(layer) for layer in missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(f"`lora.path`: {path} adapts {len(expected) - len(missing)} of the model's "
                          f"{len(expected)} {'/'.join(config.targets)} layers (not {shown}): it was trained on "
                          f"another base model; give the adapter of this model, or train a new one with "
                          f"`lora.rank` / `lora.targets`")


def lora_parts(section: LoRASection, module, params, rng):
    """`(LoRAConfig, base, trainable)` for `module`'s `params` (module docstring)."""
    full_heads = () if isinstance(module, CausalLM) else ("score",)
    base, heads = split_modules(params, full_heads)
    if section.path:
        if not Path(section.path).is_dir():
            raise ConfigError(f"`lora.path`: adapter folder {section.path} does not exist")
        try:
            loaded, adapters, saved_heads = load_peft_adapter(section.path, module)
        except ValueError as err:
            raise ConfigError(f"`lora.path`: {err}") from None
        _check_shapes(adapters, base, section.path)
        config = LoRAConfig(rank=loaded.rank, alpha=loaded.alpha, dropout=section.dropout, targets=loaded.targets)
        _check_coverage(adapters, base, config, section.path, rng)
        heads = {**heads, **{name: saved_heads[name] for name in saved_heads if name in heads}}
    else:
        config = LoRAConfig(rank=section.rank, alpha=section.alpha, dropout=section.dropout,
                            targets=tuple(section.targets))
        try:
            adapters = init_adapters(base, config, rng)
        except ValueError as err:
            raise ConfigError(f"`lora.targets`: {err}") from None
    trainable = {"lora": adapters, **({"modules": heads} if heads else {})}
    return config, base, trainable


def stage_state(module, params, optim: OptimizerConfig, mesh, lora: LoRASection | None, seed: int,
                stream: int = 5):
    """`(state, shardings)`: a LoRA train state when `lora` is set (adapters drawn from RNG
    stream `stream` of `seed`), else a full one."""
    if lora is None:
        return stage_setup.make_state(module, params, optim, mesh)
    config, base, trainable = lora_parts(lora, module, params, stage_setup.rng_key(seed, stream))
    dropout_key = stage_setup.rng_key(seed, stream, 1) if config.dropout > 0 else None
    return create_lora_train_state(LoRAModel(module, config), base, trainable, make_optimizer(optim),
                                   mesh=mesh, dropout_key=dropout_key)


def check_lora_reference(config, model_path: str | None) -> None:
    """With LoRA the reference is the base with adapters disabled; a different folder is refused."""
    if config.lora is not None and config.reference and config.reference != model_path:
        raise ConfigError(f"`reference`: with `lora` the reference policy is the base model with its adapters "
                          f"disabled; leave `reference` unset (got {config.reference})")


def reference_of(lora: LoRASection | None):
    """Reference parameters for a LoRA policy state (no adapters), None without LoRA."""
    return None if lora is None else disabled_adapters()


__all__ = ["lora_parts", "stage_state", "check_lora_reference", "reference_of"]
