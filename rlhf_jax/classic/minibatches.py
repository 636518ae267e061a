"""Epochs of shuffled minibatches over one rollout, as two nested `lax.scan`s."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def flatten_batch(tree):
    """`[E, T, ...]` leaves -> `[E * T, ...]`."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def shuffled_minibatches(rng, batch, num_minibatches: int):
    """Permute the leading axis of every leaf with one permutation, then split it into
    `[num_minibatches, batch_size // num_minibatches, ...]`."""
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % num_minibatches:
        raise ValueError(f"`num_minibatches` ({num_minibatches}) must divide the batch size ({size})")
    order = jax.random.permutation(rng, size)
    return jax.tree.map(
        lambda x: jnp.take(x, order, axis=0).reshape((num_minibatches, -1) + x.shape[1:]), batch)


def run_epochs(rng, carry, batch, *, num_epochs: int, num_minibatches: int,
               minibatch_step: Callable):
    """Apply `minibatch_step(carry, minibatch) -> (carry, metrics)` to every minibatch of
    `num_epochs` fresh shuffles of `batch` (leaves with a leading batch axis).

    Returns `(carry, metrics)` with each metric averaged over all minibatch steps.
    """

    def epoch(state, _):
        carry, rng = state
        rng, shuffle_rng = jax.random.split(rng)
        minibatches = shuffled_minibatches(shuffle_rng, batch, num_minibatches)
        carry, metrics = jax.lax.scan(minibatch_step, carry, minibatches)
        return (carry, rng), metrics

    (carry, _), metrics = jax.lax.scan(epoch, (carry, rng), None, length=num_epochs)
    return carry, jax.tree.map(jnp.mean, metrics)
