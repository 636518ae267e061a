"""KL-penalty coefficient controllers as optax-style `(init, update)` pairs.

The coefficient lives in a one-field pytree (`KLControllerState`), so it can sit in a train
state, be checkpointed, and be updated inside a jitted step:

    controller = adaptive_kl_controller(init_coef=0.1, target=6.0, horizon=10_000)
    kl_state = controller.init()
    ...
    kl_state = controller.update(kl_state, mean_kl, n_steps=batch_size)
    rewards = shape_rewards(..., kl_coef=kl_state.coef)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp


class KLControllerState(NamedTuple):
    """`coef`: the current KL-penalty coefficient, a float32 scalar."""

    coef: jnp.ndarray


class KLController(NamedTuple):
    """`init() -> state`; `update(state, current_kl, n_steps) -> state`."""

    init: Callable[[], KLControllerState]
    update: Callable[..., KLControllerState]


def _check_static_nonnegative(value, name):
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}")


def _check_static_positive(value, name):
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


def adaptive_kl_controller(init_coef, target, horizon) -> KLController:
    """Proportional controller that steers the measured KL towards `target`.

    Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences",
    arXiv:1909.08593:

        e = clip(KL / target - 1, -0.2, 0.2)
        coef <- coef * (1 + e * n_steps / horizon)

    Args:
      init_coef: starting coefficient (typically 0.1-0.2), >= 0.
      target: desired KL per sequence (typically 6), > 0.
      horizon: number of samples over which the error is corrected (typically 10000), > 0.

    Returns:
      A `KLController`. `update(state, current_kl, n_steps)` accepts traced `current_kl`
      (the batch's mean KL) and `n_steps` (samples seen since the last update).
    """
    _check_static_nonnegative(init_coef, "init_coef")
    _check_static_positive(target, "target")
    _check_static_positive(horizon, "horizon")

    def init() -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(init_coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        if jnp.ndim(current_kl) != 0:
            raise ValueError(f"`current_kl` must be a scalar, got shape {jnp.shape(current_kl)}")
        current_kl = jnp.asarray(current_kl, jnp.float32)
        error = jnp.clip(current_kl / jnp.float32(target) - 1.0, -0.2, 0.2)
        factor = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / jnp.float32(horizon)
        return KLControllerState(coef=jnp.asarray(state.coef, jnp.float32) * factor)

    return KLController(init=init, update=update)


def fixed_kl_controller(coef) -> KLController:
    """A constant coefficient behind the same interface as `adaptive_kl_controller`.

    Args:
      coef: the KL-penalty coefficient, >= 0.
    """
    _check_static_nonnegative(coef, "coef")

    def init() -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(coef, jnp.float32))

    def update(state: KLControllerState, current_kl, n_steps) -> KLControllerState:
        del current_kl, n_steps
        return KLControllerState(coef=jnp.asarray(state.coef, jnp.float32))

    return KLController(init=init, update=update)
