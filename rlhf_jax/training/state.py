"""Train states: parameters, optimizer and step counter in one pytree.

`TrainState` is Flax's `flax.training.train_state.TrainState` (fields `step`, `apply_fn`,
`params`, `tx`, `opt_state`; `state.apply_gradients(grads=grads)` runs the optimizer and
increments `step`). It needs no extra fields here: RNG keys are passed to step functions
explicitly, and the count of skipped non-finite updates lives in the optimizer state
(`rlhf_jax.training.optim.optimizer_metrics`). `step` counts optimizer updates (gradient
accumulation happens inside a step, `num_microbatches`).

The models of RLHF map onto it as follows:
- policy, value model, reward model: one `TrainState` each (`create_train_state`);
- the frozen reference policy: plain parameters, `reference_params(policy_params)`, used
  only in forward passes and never handed to an optimizer;
- a value model started from a reward model: its `TrainState` built from the reward model's
  parameters (the model code decides how heads map).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from rlhf_jax.training.sharding import shard_params, shardings_like_params


class TrainState(train_state.TrainState):
    """Flax's TrainState: `step`, `apply_fn`, `params`, `tx`, `opt_state` (see module doc)."""


def create_train_state(
    module: nn.Module | Callable,
    params,
    optimizer: optax.GradientTransformation,
    *,
    param_shardings=None,
) -> TrainState:
    """A fresh `TrainState` (step 0, `optimizer.init(params)`).

    `module` is a Flax module (its `apply` becomes `state.apply_fn`) or an apply function.
    With `param_shardings` (a tree of `NamedSharding`s matching `params`, e.g. from
    `rlhf_jax.training.sharding.param_shardings`), the parameters are placed with them and the
    optimizer state is created directly with matching shardings (`train_state_shardings`), so
    no device ever holds the full optimizer state.

    Without `param_shardings` the state holds the given `params` arrays themselves (as Flax
    does): donating the state to a step deletes them, so take `reference_params(params)`
    before training rather than keeping the original arrays as the reference.
    """
    apply_fn = module.apply if isinstance(module, nn.Module) else module
    if not callable(apply_fn):
        raise ValueError(f"`module` must be a flax.linen.Module or a callable, got {type(module).__name__}")

    def build(initial_params):
        return TrainState.create(apply_fn=apply_fn, params=initial_params, tx=optimizer)

    if param_shardings is None:
        return build(params)
    params = shard_params(params, param_shardings)
    shardings = train_state_shardings(jax.eval_shape(build, params), param_shardings)
    return jax.jit(build, out_shardings=shardings)(params)


def _mesh_of(param_shardings):
    leaves = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    meshes = {leaf.mesh for leaf in leaves if isinstance(leaf, jax.sharding.NamedSharding)}
    if len(meshes) != 1:
        raise ValueError(
            f"`param_shardings` must be NamedShardings over one mesh, found {len(meshes)} meshes"
        )
    return meshes.pop()


def train_state_shardings(state: TrainState, param_shardings):
    """Shardings for every leaf of `state` (real or `jax.eval_shape` output): parameters and
    the optimizer state that mirrors them follow `param_shardings`; `step` and other counters
    are replicated. Use as `in_shardings`/`out_shardings` of a jitted step."""
    return shardings_like_params(state, state.params, param_shardings, _mesh_of(param_shardings))


def reference_params(params):
    """A frozen copy of policy parameters for the reference model: separate buffers (so
    donating the policy state never invalidates them), used only in forward passes and never
    passed to an optimizer or differentiated."""
    return jax.tree.map(jnp.copy, params)


__all__ = ["TrainState", "create_train_state", "train_state_shardings", "reference_params"]
