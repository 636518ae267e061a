"""Train states for LoRA: only the adapters are differentiated and hold optimizer state.

A `LoRATrainState` is a `TrainState` whose `params` are the trainable parts only,
`{"lora": adapters}` (plus `"modules": {...}` for subtrees trained in full, such as a reward
model's fresh `score` head), and whose `apply_fn` is a `LoRAApply`: a pytree holding the
frozen base parameters (and the dropout key) next to the static `LoRAModel`. The step functions
are unchanged: they call `state.apply_fn({"params": params}, ...)` and differentiate with
respect to `state.params`, so

- gradients and the optimizer state (`tx.init(params)`) have the adapters' size, never the
  base's;
- the base is an ordinary argument of every compiled step (not a constant baked into the
  program), stored once, sharded like a full model's parameters (`lora_state_shardings`),
  donated and returned unchanged with the state. It is not written into checkpoints: the
  pipeline saves `without_frozen_base(state)` (adapters, trained heads, optimizer state, step,
  dropout key) and on resume puts back the base it has just re-read from its source
  (`with_frozen_base`), after checking its fingerprint (`rlhf_jax.pipeline.frozen_base`);
- the frozen reference policy is the same apply function with the adapters disabled:
  `disabled_adapters()` = `{"lora": {}}` passed as the reference parameters.

Dropout on the adapter input (`LoRAConfig.dropout`) draws from `LoRAApply.dropout_key`, which
`apply_gradients` advances after every update (so each step gets fresh masks, and a resumed run
the same masks as an uninterrupted one). Every forward pass through `state.apply_fn` therefore
uses dropout when it is > 0, including scoring passes inside a step; the RL stages refuse
dropout > 0 for that reason (a rollout's log-probs must come from the deterministic policy).
Evaluation and sampling go through `inference_model`, which never applies dropout.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.models.lora import LoRAModel, merge_adapters
from rlhf_jax.training.sharding import (
    opt_state_shardings, param_shardings, replicated, shard_params, shardings_like_params,
)
from rlhf_jax.training.state import TrainState


@struct.dataclass
class LoRAApply:
    """`apply_fn` of a LoRA train state: `(variables, *args, **kw) -> model output` with
    `variables["params"]` the trainable parts; the frozen `base` and the `dropout_key` are leaves."""

    model: LoRAModel = struct.field(pytree_node=False)
    base: Any = None
    dropout_key: Any = None

    def variables(self, trainable) -> dict:
        """The `LoRAModel` parameters: `{"base": ..., "lora": ..., "modules"?: ...}`."""
        return {"base": self.base, **trainable}

    def __call__(self, variables, *args, **kwargs):
        return self.model.apply({"params": self.variables(variables["params"])}, *args,
                                dropout_rng=self.dropout_key, **kwargs)


class LoRATrainState(TrainState):
    """A `TrainState` whose `apply_fn` (a `LoRAApply`) is part of the pytree (module doc)."""

    apply_fn: Callable = struct.field(pytree_node=True)

    def apply_gradients(self, *, grads, **kwargs):
        new_state = super().apply_gradients(grads=grads, **kwargs)
        key = self.apply_fn.dropout_key
        if key is None:
            return new_state
        return new_state.replace(apply_fn=new_state.apply_fn.replace(dropout_key=jax.random.split(key)[1]))


def disabled_adapters() -> dict:
    """Reference parameters for a LoRA policy state: no adapters, i.e. the frozen base."""
    return {"lora": {}}


def is_lora_state(state) -> bool:
    return isinstance(getattr(state, "apply_fn", None), LoRAApply)


def inference_model(module, state):
    """`(model, params)` for evaluation, sampling and export forward passes without dropout:
    `(module, state.params)` for a plain state, `(LoRAModel, {"base", "lora", ...})` for LoRA."""
    if is_lora_state(state):
        return state.apply_fn.model, state.apply_fn.variables(state.params)
    return module, state.params


def merged_params(state):
    """Plain parameters of the trained model (adapters merged for a LoRA state)."""
    if is_lora_state(state):
        apply = state.apply_fn
        return merge_adapters(apply.variables(state.params), apply.model.lora.scale)
    return state.params


def _merged_tree(base, trainable) -> dict:
    """One tree holding the base's and the trainable leaves under distinct paths (for
    `shardings_like_params`): base paths `decoder/...`, trainable `lora/...`, `modules/...`."""
    return {**base, **trainable}


def lora_state_shardings(state, base_shardings, trainable_shardings, mesh):
    """Shardings for every leaf of a LoRA state: base leaves as `base_shardings`, adapters and
    the optimizer state mirroring them as `trainable_shardings`; counters and the dropout key
    replicated."""
    params = _merged_tree(state.apply_fn.base, state.params)
    return shardings_like_params(state, params, _merged_tree(base_shardings, trainable_shardings), mesh)


def create_lora_train_state(model: LoRAModel, base, trainable, optimizer: optax.GradientTransformation, *,
                            mesh=None, dropout_key=None, **sharding_options):
    """`(state, shardings)`: a `LoRATrainState` at step 0 with `tx.init(trainable)`.

    With `mesh`, the base and the trainable parameters are placed with `param_shardings`
    (FSDP over the mesh's "fsdp" axis for large leaves; `sharding_options` such as `fsdp`,
    `min_size`, `rules` are passed on), the optimizer state is created
    directly with matching shardings and `step` is a replicated int32; `shardings` is then the
    tree for `jit` in/out shardings (None without a mesh).

    The state holds `base` and `trainable` themselves (without a mesh), and a step made by
    `make_train_step` donates the state: after the first step the arrays passed in are
    deleted. Read the base back as `state.apply_fn.base` (the same arrays, returned with every
    new state), the model for evaluation and sampling from `inference_model(model, state)`, and
    the merged plain parameters from `merged_params(state)`.
    """
    if "lora" not in trainable:
        raise ValueError(f"`trainable` must hold the adapters under 'lora', got keys {sorted(trainable)}")

    if mesh is None:
        opt_state = optimizer.init(trainable)
        shardings = None
    else:
        base_shardings = param_shardings(base, mesh, **sharding_options)
        trainable_shardings = param_shardings(trainable, mesh, **sharding_options)
        base = shard_params(base, base_shardings)
        trainable = shard_params(trainable, trainable_shardings)
        opt_shardings = opt_state_shardings(optimizer, trainable, trainable_shardings, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
        if dropout_key is not None:
            dropout_key = jax.device_put(dropout_key, replicated(mesh))
    # Built outside `jit`, so the base arrays are held as they are (a jitted constructor would
    # return copies of them).
    state = LoRATrainState(step=0, apply_fn=LoRAApply(model=model, base=base, dropout_key=dropout_key),
                           params=trainable, tx=optimizer, opt_state=opt_state)
    if mesh is not None:
        state = state.replace(step=jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)))
        shardings = lora_state_shardings(state, base_shardings, trainable_shardings, mesh)
    return state, shardings


def _is_lora_apply(node) -> bool:
    return isinstance(node, LoRAApply)


def _path_name(path) -> str:
    return ".".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def frozen_bases(tree) -> dict[str, Any]:
    """`{name: base}` of every LoRA state's frozen base in `tree` (a carry of train states),
    named by the path of its `apply_fn`, e.g. `{"policy.apply_fn": {...}}`; empty for a tree
    without LoRA states."""
    nodes, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_lora_apply)
    return {_path_name(path): node.base for path, node in nodes if _is_lora_apply(node)}


def without_frozen_base(tree):
    """`tree` with every LoRA state's frozen base dropped (`base=None`): what changes during
    training (adapters, trained heads, optimizer state, step, dropout key) and nothing else."""
    return jax.tree.map(lambda node: node.replace(base=None) if _is_lora_apply(node) else node, tree,
                        is_leaf=_is_lora_apply)


def with_frozen_base(tree, source):
    """`tree` (e.g. restored from `without_frozen_base`) with the frozen bases of `source`, a tree
    of the same structure that holds them (the freshly built carry)."""
    return jax.tree.map(lambda node, full: node.replace(base=full.base) if _is_lora_apply(node) else node,
                        tree, source, is_leaf=_is_lora_apply)


__all__ = [
    "LoRAApply", "LoRATrainState", "disabled_adapters", "is_lora_state", "inference_model", "merged_params",
    "lora_state_shardings", "create_lora_train_state", "frozen_bases", "without_frozen_base", "with_frozen_base",
]
