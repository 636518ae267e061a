"""Advantage estimators: GAE, discounted returns, and group baselines (GRPO, RLOO).

Time is the LAST axis: token-level arrays are `[B, T]` (any leading shape `[..., T]` works,
so the functions also take a single trajectory `[T]`, e.g. under `jax.vmap`).

GAE and returns are both the backward affine recurrence `x_t = offset_t + coef_t * x_{t+1}`.
`method="scan"` solves it with a reverse `jax.lax.scan` (T sequential steps, the fastest on
CPU); `method="associative"` with `jax.lax.associative_scan(reverse=True)` over the affine
maps `x -> offset + coef * x` (depth O(log T), which suits accelerators and long rollouts).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_floating, check_in, check_rank, check_same_shape

SCAN_METHODS = ("scan", "associative")
GROUP_SCALES = ("group", "batch", "none")


def _check_discount(value, name):
    """Scalars only (a `[B]` array would broadcast along time); Python numbers in [0, 1]."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {jnp.shape(value)}")
    if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}")


def _check_time_inputs(rewards, values, mask, dones, bootstrap_value):
    if jnp.ndim(rewards) < 1:
        raise ValueError(
            f"`rewards` must have a time axis [..., T], got shape {jnp.shape(rewards)}"
        )
    check_floating(rewards, "rewards")
    if values is not None:
        check_floating(values, "values")
    check_same_shape(rewards=rewards, values=values, mask=mask, dones=dones)
    if bootstrap_value is not None and jnp.shape(bootstrap_value) != jnp.shape(rewards)[:-1]:
        raise ValueError(
            f"`bootstrap_value` must have shape {jnp.shape(rewards)[:-1]} (the rewards' shape "
            f"without the time axis), got {jnp.shape(bootstrap_value)}"
        )


def _reverse_affine_scan(offsets, coefs, method):
    """Solve `x_t = offsets_t + coefs_t * x_{t+1}` backwards over the last axis, `x_T = 0`."""
    if method == "scan":

        def step(next_x, inputs):
            offset, coef = inputs
            x = offset + coef * next_x
            return x, x

        time_major = (jnp.moveaxis(offsets, -1, 0), jnp.moveaxis(coefs, -1, 0))
        init = jnp.zeros(offsets.shape[:-1], offsets.dtype)
        _, xs = jax.lax.scan(step, init, time_major, reverse=True)
        return jnp.moveaxis(xs, 0, -1)

    # Each step is the affine map x -> offset + coef * x. With reverse=True, `later` is the
    # composition of the maps after time t (applied first) and `earlier` the map(s) at t.
    def compose(later, earlier):
        later_coef, later_offset = later
        earlier_coef, earlier_offset = earlier
        return earlier_coef * later_coef, earlier_offset + earlier_coef * later_offset

    _, xs = jax.lax.associative_scan(compose, (coefs, offsets), reverse=True, axis=offsets.ndim - 1)
    return xs


def _prepare(rewards, values, mask, dones, bootstrap_value):
    """Cast to float32 (at least), zero masked rewards/values; return not-done and V_{t+1}."""
    dtype = jnp.promote_types(jnp.result_type(rewards), jnp.float32)
    rewards = jnp.asarray(rewards, dtype)
    # `where`, not a product, so NaN / inf in padding cannot leak in (NaN * 0 is NaN).
    counted = None if mask is None else jnp.asarray(mask) != 0
    if counted is not None:
        rewards = jnp.where(counted, rewards, 0.0)
    if values is not None:
        values = jnp.asarray(values, dtype)
        if counted is not None:
            values = jnp.where(counted, values, 0.0)
    not_done = jnp.ones_like(rewards) if dones is None else 1.0 - jnp.asarray(dones, dtype)
    if bootstrap_value is None:
        bootstrap_value = jnp.zeros(rewards.shape[:-1], dtype)
    bootstrap_value = jnp.asarray(bootstrap_value, dtype)
    return dtype, rewards, values, counted, not_done, bootstrap_value


def gae(rewards, values, mask=None, *, gamma, gae_lambda, dones=None, bootstrap_value=None, method="scan"):
    """Generalized Advantage Estimation (Schulman et al., 2016, arXiv:1506.02438).

        delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
        A_t     = delta_t + gamma * gae_lambda * (1 - done_t) * A_{t+1},     A_T = 0
        returns = A + V

    `V_T`, the value of the state after the last step, is `bootstrap_value` (0 when None).
    `done_t = 1` marks that step t ended an episode, so nothing flows back across it.

    With a `mask` (nonzero = counted), rewards and values at masked positions are treated as 0
    (whatever they hold, NaN included) and both outputs are 0 there. For right-padded LM
    responses this makes the value after the last response token 0 (the standard RLHF
    convention), and prompt / padding values never leak into the response's advantages.
    The recurrence itself still runs through masked steps, so a nonzero `bootstrap_value`
    reaches a right-padded row through its padding (discounted by `gamma * gae_lambda` per step);
    mark such rows `done` at their last step if they ended.

    Args:
      rewards: `[B, T]` per-step rewards (per-token shaped rewards for LMs).
      values: `[B, T]` value estimates `V_t` of the states where each step starts.
      mask: optional `[B, T]`, 1 on counted steps, 0 on padding.
      gamma: discount in [0, 1] (LM default 1.0), a Python float or traced scalar.
      gae_lambda: GAE lambda in [0, 1] (typically 0.95), a Python float or traced scalar.
      dones: optional `[B, T]` episode-end flags (bool or float) for environment rollouts.
      bootstrap_value: optional `[B]` value of the state after the last step.
      method: `"scan"` (reverse `lax.scan`) or `"associative"` (`lax.associative_scan`).

    Returns:
      `(advantages, returns)`, each `[B, T]` float32 (or wider if the inputs are).
    """
    check_in(method, SCAN_METHODS, "method")
    if values is None:
        raise ValueError("`values` is required by `gae` (value estimates [B, T]); for returns "
                         "without a value function use `discounted_returns(rewards, mask, gamma=...)`")
    _check_time_inputs(rewards, values, mask, dones, bootstrap_value)
    _check_discount(gamma, "gamma")
    _check_discount(gae_lambda, "gae_lambda")
    dtype, rewards, values, counted, not_done, bootstrap_value = _prepare(
        rewards, values, mask, dones, bootstrap_value
    )
    gamma = jnp.asarray(gamma, dtype)
    gae_lambda = jnp.asarray(gae_lambda, dtype)
    next_values = jnp.concatenate([values[..., 1:], bootstrap_value[..., None]], axis=-1)
    deltas = rewards + gamma * next_values * not_done - values
    advantages = _reverse_affine_scan(deltas, gamma * gae_lambda * not_done, method)
    returns = advantages + values
    if counted is not None:
        advantages = jnp.where(counted, advantages, 0.0)
        returns = jnp.where(counted, returns, 0.0)
    return advantages, returns


def discounted_returns(
    rewards, mask=None, *, gamma, dones=None, bootstrap_value=None, method="scan"
):
    """Discounted reward-to-go `G_t = r_t + gamma * (1 - done_t) * G_{t+1}`, `G_T = bootstrap`.

    The Monte-Carlo return of REINFORCE (Williams, 1992). Masked positions have reward 0 and
    output 0, as in `gae`.

    Args:
      rewards: `[B, T]` per-step rewards.
      mask: optional `[B, T]`, 1 on counted steps.
      gamma: discount in [0, 1], a Python float or traced scalar.
      dones: optional `[B, T]` episode-end flags.
      bootstrap_value: optional `[B]` value of the state after the last step (0 when None).
      method: `"scan"` or `"associative"`, as in `gae`.

    Returns:
      `[B, T]` float32 returns.
    """
    check_in(method, SCAN_METHODS, "method")
    _check_time_inputs(rewards, None, mask, dones, bootstrap_value)
    _check_discount(gamma, "gamma")
    dtype, rewards, _, counted, not_done, bootstrap_value = _prepare(
        rewards, None, mask, dones, bootstrap_value
    )
    coefs = jnp.asarray(gamma, dtype) * not_done
    # Fold G_T into the last step: G_{T-1} = r_{T-1} + coef_{T-1} * bootstrap.
    offsets = rewards.at[..., -1].add(coefs[..., -1] * bootstrap_value)
    returns = _reverse_affine_scan(offsets, coefs, method)
    if counted is not None:
        returns = jnp.where(counted, returns, 0.0)
    return returns


def _grouped(rewards, group_size):
    check_rank(rewards, 1, "rewards")
    check_floating(rewards, "rewards")
    is_int = isinstance(group_size, numbers.Integral) and not isinstance(group_size, bool)
    if not is_int or group_size < 2:
        raise ValueError(f"`group_size` must be an int >= 2, got {group_size!r}")
    batch = jnp.shape(rewards)[0]
    if batch % group_size != 0:
        raise ValueError(
            f"`rewards` has {batch} entries, not a multiple of `group_size` = {group_size}"
        )
    dtype = jnp.promote_types(jnp.result_type(rewards), jnp.float32)
    return jnp.asarray(rewards, dtype).reshape(batch // group_size, int(group_size))


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4):
    """Group-relative advantages of GRPO (Shao et al., 2024, arXiv:2402.03300).

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps)

    over the `group_size` responses to the same prompt, std unbiased (ddof = 1). Groups are
    contiguous: rows `i*G .. i*G + G - 1` share a prompt.

    Args:
      rewards: `[B]` sequence rewards, `B = n_prompts * group_size`.
      group_size: responses per prompt `G >= 2` (static int).
      scale: `"group"` divides by each group's std; `"batch"` by the std of the whole batch
        (the mean is still per group), which is robust to groups whose rewards are all equal;
        `"none"` does not divide (Dr. GRPO, Liu et al., 2025, arXiv:2503.20783).
      eps: added to the std.

    Returns:
      `[B]` float32 advantages.
    """
    check_in(scale, GROUP_SCALES, "scale")
    grouped = _grouped(rewards, group_size)  # [n_prompts, G]
    centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale == "group":
        centered = centered / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centered = centered / (jnp.std(grouped, ddof=1) + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards, group_size):
    """REINFORCE leave-one-out advantages (Ahmadian et al., 2024, arXiv:2402.14740).

        A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g(R))

    within each contiguous group of `group_size` responses to the same prompt.

    Args:
      rewards: `[B]` sequence rewards, `B = n_prompts * group_size`.
      group_size: responses per prompt `G >= 2` (static int).

    Returns:
      `[B]` float32 advantages.
    """
    grouped = _grouped(rewards, group_size)
    others_mean = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)
