"""Watching for NaN and inf: skipped-update counters and a finiteness check of whole pytrees.

With `OptimizerConfig.nonfinite = "skip"` the optimizer is wrapped in `optax.apply_if_finite`,
whose state (`ApplyIfFiniteState`) counts the updates it dropped because a gradient held a
NaN or inf: `total_notfinite` over the run and `notfinite_count` in a row (reset by the next
finite update). `skip_counts` reads them from any pytree holding such states (one train
state, or a carry with a policy and a value state), so a training loop can log them and stop
a run that keeps producing non-finite gradients. `nonfinite_leaves` names the floating-point
leaves of a pytree that hold a NaN or inf, to check parameters before they are written.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.training.sharding import path_name

SKIPS = "optim/nonfinite_skips"  # updates skipped for non-finite gradients so far (all optimizers)
CONSECUTIVE_SKIPS = "optim/consecutive_skips"  # the longest current run of skips (any optimizer)


def _skip_states(tree) -> list[optax.ApplyIfFiniteState]:
    is_state = lambda node: isinstance(node, optax.ApplyIfFiniteState)
    return [leaf for leaf in jax.tree.leaves(tree, is_leaf=is_state) if is_state(leaf)]


def has_skip_counters(tree) -> bool:
    """Whether `tree` holds an `optax.apply_if_finite` state (`nonfinite="skip"`)."""
    return bool(_skip_states(tree))


def skip_counts(tree) -> dict[str, int]:
    """`{SKIPS: total, CONSECUTIVE_SKIPS: in a row}` as host ints, over every
    `apply_if_finite` state in `tree`: skips summed, the run in a row the longest of any
    optimizer ({} when there is none). Fetches two scalars per state from the device."""
    states = _skip_states(tree)
    if not states:
        return {}
    totals, runs = jax.device_get(([s.total_notfinite for s in states], [s.notfinite_count for s in states]))
    return {SKIPS: int(sum(int(t) for t in totals)), CONSECUTIVE_SKIPS: int(max(int(r) for r in runs))}


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def nonfinite_leaves(tree) -> list[str]:
    """Paths ("a/b/c") of the floating-point leaves of `tree` that hold a NaN or inf.

    Integer, boolean and PRNG-key leaves are not checked. Device arrays are reduced on device
    (one compiled pass, one small transfer); sharded arrays work as they are.
    """
    named = [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not named:
        return []
    finite = np.asarray(jax.device_get(_all_finite([leaf for _, leaf in named])))
    return [name for (name, _), ok in zip(named, finite) if not ok]


__all__ = ["SKIPS", "CONSECUTIVE_SKIPS", "has_skip_counters", "skip_counts", "nonfinite_leaves"]
