"""What every training step shares: the gradient update, and jitting a step for a mesh.

`gradient_step(state, loss_fn, batch, ...)` is the body of `sft_step`, `reward_step` and
`preference_step`: the mean loss and gradients over `num_microbatches` slices of the batch
(`accumulate_gradients`, a `lax.scan`), an all-reduce over `axis_name` when the step runs
inside `jax.shard_map`/`jax.pmap`, then `state.apply_gradients`.

`make_train_step(step, mesh=..., **options)` jits a step with its static options bound and
the state donated:

    run = make_train_step(preference_step, mesh=mesh, state_shardings=shardings, config=config)
    state, metrics = run(state, batch, ref_params)      # ref_params optional

Without a mesh this is `jax.jit(partial(step, **options), donate_argnums=0)`. With a mesh the
batch is split over the ("data", "fsdp") axes, the state follows `state_shardings` (e.g.
`train_state_shardings(state, param_shardings(...))` for FSDP; default: replicated), the
reference parameters follow `reference_shardings` (default: replicated) and the metrics come
back replicated. XLA inserts the collectives (gradient all-reduce; FSDP all-gathers and
reduce-scatters), so the step function itself has no sharding code. The returned
`JittedStep` reports its compile-cache size, so `run_loop(compiled=[run])` can check that the
step never compiles again after the first step.
"""
from __future__ import annotations

from typing import Callable

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax.training.optim import accumulate_gradients
from rlhf_jax.training.sharding import batch_sharding, cross_replica_mean, replicated


def gradient_step(state, loss_fn: Callable, batch, *, num_microbatches: int = 1, axis_name=None):
    """One optimizer update from `loss_fn(params, microbatch) -> (loss, metrics)`.

    The loss, metrics and gradients are averaged over `num_microbatches` strided slices of
    `batch` (each slice's activations only are alive at a time) and then over `axis_name`
    (`lax.pmean`, a no-op when None). Adds `optim/grad_norm` (global norm of the averaged
    gradients, before clipping). Returns `(new_state, metrics)`.
    """
    _, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, num_microbatches)
    grads, metrics = cross_replica_mean((grads, metrics), axis_name)
    metrics = dict(metrics)
    metrics["optim/grad_norm"] = optax.global_norm(grads)
    return state.apply_gradients(grads=grads), metrics


def shard_count(axis_name) -> int | jax.Array:
    """Number of shards along `axis_name` inside `shard_map`/`pmap` (1 when None)."""
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def make_train_step(
    step: Callable,
    *,
    mesh: Mesh | None = None,
    state_shardings=None,
    reference_shardings=None,
    donate: bool = True,
    **options,
) -> "JittedStep":
    """`run(state, batch, ref_params=None) -> (new_state, metrics)`: `step` jitted once.

    Args:
      step: a step function `step(state, batch, **options)` (plus `ref_params=` when the
        caller passes reference parameters).
      mesh: None for plain `jax.jit`; a `Mesh` for explicit in/out shardings (module doc).
      state_shardings: shardings of the train state (a tree or one sharding); default
        replicated over `mesh`.
      reference_shardings: shardings of `ref_params`; default replicated over `mesh`.
      donate: donate the state buffers to the update (the input state is invalid afterwards).
      options: static keyword options of `step` (hashable: `config=`, `num_microbatches=`...).
    """

    def without_reference(state, batch):
        return step(state, batch, **options)

    def with_reference(state, batch, ref_params):
        return step(state, batch, ref_params=ref_params, **options)

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        jitted = [jax.jit(fn, donate_argnums=donate_argnums) for fn in (without_reference, with_reference)]
    else:
        state_shardings = replicated(mesh) if state_shardings is None else state_shardings
        reference_shardings = replicated(mesh) if reference_shardings is None else reference_shardings
        in_shardings = (state_shardings, batch_sharding(mesh))
        jitted = [
            jax.jit(fn, in_shardings=in_shardings + extra, out_shardings=(state_shardings, replicated(mesh)),
                    donate_argnums=donate_argnums)
            for fn, extra in ((without_reference, ()), (with_reference, (reference_shardings,)))
        ]

    return JittedStep(*jitted)


class JittedStep:
    """A step jitted by `make_train_step`: `step(state, batch, ref_params=None)`.

    Calls without `ref_params` go to one jitted function, calls with them to another.
    `_cache_size()` (the name `jax.jit` outputs use) is the number of compiled versions of
    both, which `rlhf_jax.pipeline.loop.run_loop(compiled=[step])` watches to fail a run
    whose step compiles again after its first step.
    """

    def __init__(self, without_reference: Callable, with_reference: Callable):
        self._jitted = (without_reference, with_reference)

    def __call__(self, state, batch, ref_params=None):
        if ref_params is None:
            return self._jitted[0](state, batch)
        return self._jitted[1](state, batch, ref_params)

    def _cache_size(self) -> int:
        return sum(fn._cache_size() for fn in self._jitted)


__all__ = ["gradient_step", "shard_count", "make_train_step", "JittedStep"]
