"""The optimizer: global-norm clipping -> AdamW with a decay mask and a warmup-then-decay LR.

One config (`OptimizerConfig`) builds the whole optax chain (`make_optimizer`):

    [apply_if_finite] ( clip_by_global_norm -> adamw(schedule, mask) )

- Learning rate (`make_schedule`): linear warmup from 0 to `learning_rate` over
  `warmup_steps`, then cosine or linear decay to `end_lr_ratio * learning_rate` at
  `total_steps` (held there afterwards), or constant. Steps count optimizer updates (one per
  training step), and skipped non-finite updates do not advance it.
- Weight decay (decoupled, Loshchilov & Hutter 2019, arXiv:1711.05101) applies only to arrays
  with `ndim >= 2` (`decay_mask`): matrices and embeddings decay; biases, norm scales and
  every other 1-D or scalar parameter do not.
- Adam `eps` defaults to 1e-5, the value PPO implementations use (Huang et al. 2022, "The 37
  implementation details of PPO"); 1e-8 is the optax default.
- Gradient accumulation is not part of the optimizer: `accumulate_gradients` (the training
  steps' `num_microbatches`, config key `train.num_microbatches`) averages the gradients of
  the micro-batches inside one compiled step with `lax.scan`, so every step applies exactly
  one update.
- Non-finite gradients (`nonfinite`):
  * "skip": `optax.apply_if_finite` drops an update whose gradients hold a NaN/Inf (parameters
    and optimizer state unchanged) and counts it (`optimizer_metrics` reports the count,
    `rlhf_jax.training.nonfinite.skip_counts` the counts of every optimizer in a carry).
    After `max_consecutive_skips` skips in a row it lets the next update through, so a run
    that has truly diverged shows NaN instead of silently stalling; the pipeline's training
    loop (`rlhf_jax.pipeline.loop.run_loop`) stops the run with a clear message as soon as
    the skips in a row reach `max_consecutive_skips`, before that happens.
  * "halt": the chain is left as is; the pipeline's training loop calls
    `check_finite(metrics, step)` after each step, which raises `FloatingPointError` naming
    the step and the metrics.
  * "none": no handling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.ops.checks import check_in, check_positive

SCHEDULES = ("cosine", "linear", "constant")
NONFINITE_POLICIES = ("skip", "halt", "none")


@dataclasses.dataclass
class OptimizerConfig:
    learning_rate: float = 1e-5  # peak learning rate, reached at the end of warmup
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps
    total_steps: int = 1000  # the decay ends here (cosine / linear schedules); a pipeline stage sets it to
    # its run's length (`with_schedule_length`), which its output folder's config.yaml records
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    end_lr_ratio: float = 0.0  # final LR = end_lr_ratio * learning_rate
    weight_decay: float = 0.0  # decoupled AdamW decay, on arrays with ndim >= 2 only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-5  # Adam epsilon; 1e-5 is the usual RL choice
    max_grad_norm: float | None = 1.0  # global-norm clipping; None or 0 disables it
    nonfinite: Literal["skip", "halt", "none"] = "skip"
    max_consecutive_skips: int = 10  # "skip": stop the run after this many skipped updates in a row

    def __post_init__(self):
        check_in(self.schedule, SCHEDULES, "schedule")
        check_in(self.nonfinite, NONFINITE_POLICIES, "nonfinite")
        check_positive(self.learning_rate, "learning_rate")
        check_positive(self.eps, "eps")
        check_positive(self.max_consecutive_skips, "max_consecutive_skips")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"`total_steps` ({self.total_steps}) must exceed `warmup_steps` "
                f"({self.warmup_steps}) for the {self.schedule!r} schedule"
            )
        if not 0.0 <= self.end_lr_ratio <= 1.0:
            raise ValueError(f"`end_lr_ratio` must be in [0, 1], got {self.end_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"`max_grad_norm` must be >= 0 or None, got {self.max_grad_norm}")


def make_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step `s` (w = warmup, T = total steps):

        s < w:        lr * s / w
        cosine:       end + (lr - end) * 0.5 * (1 + cos(pi * min(s - w, T - w) / (T - w)))
        linear:       lr + (end - lr) * min(s - w, T - w) / (T - w)
        constant:     lr
    with end = end_lr_ratio * lr.
    """
    peak = config.learning_rate
    end = config.end_lr_ratio * peak
    warmup = config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=config.total_steps, end_value=end,
        )
    warmup_part = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if config.schedule == "linear":
        decay_part = optax.linear_schedule(peak, end, config.total_steps - warmup)
    else:
        decay_part = optax.constant_schedule(peak)
    return optax.join_schedules([warmup_part, decay_part], [warmup])


def decay_mask(params) -> Any:
    """True for the leaves that get weight decay: arrays with `ndim >= 2` (weights,
    embeddings); False for biases, norm scales and scalars."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optax chain described in the module docstring, built from `config`."""
    parts = []
    if config.max_grad_norm:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay, mask=decay_mask,
        )
    )
    optimizer = optax.chain(*parts)
    if config.nonfinite == "skip":
        optimizer = optax.apply_if_finite(optimizer, config.max_consecutive_skips)
    return optimizer


def _find_states(opt_state, kind):
    leaves = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, kind))
    return [leaf for leaf in leaves if isinstance(leaf, kind)]


def optimizer_metrics(opt_state, schedule: optax.Schedule) -> dict[str, jax.Array]:
    """In-graph optimizer metrics for logging, read from an optimizer state built by
    `make_optimizer`:

    - `optim/learning_rate`: the LR the next update will use, `schedule(updates applied)`;
    - `optim/nonfinite_skips`: updates skipped for non-finite gradients so far (0 unless
      `nonfinite="skip"`).
    """
    metrics = {}
    counts = _find_states(opt_state, optax.ScaleByScheduleState)
    if counts:
        metrics["optim/learning_rate"] = jnp.asarray(schedule(counts[0].count), jnp.float32)
    skips = _find_states(opt_state, optax.ApplyIfFiniteState)
    metrics["optim/nonfinite_skips"] = skips[0].total_notfinite if skips else jnp.zeros([], jnp.int32)
    return metrics


def check_finite(metrics: dict, step) -> None:
    """Host-side halt check: raise `FloatingPointError` if any metric holds a NaN or Inf.

    `step` is the training step the metrics come from (named in the message). Call it after
    each step when `OptimizerConfig.nonfinite == "halt"`; it fetches the metrics from device.
    """
    bad = {}
    for name, value in metrics.items():
        host = np.asarray(jax.device_get(value))
        if np.issubdtype(host.dtype, np.inexact) and not np.all(np.isfinite(host)):
            count = int(np.size(host) - np.isfinite(host).sum())
            bad[name] = host.item() if host.size == 1 else f"<{count} non-finite of {host.size}>"
    if bad:
        detail = ", ".join(f"{name}={value}" for name, value in sorted(bad.items()))
        raise FloatingPointError(f"non-finite values at step {int(np.asarray(step))}: {detail}")


def accumulate_gradients(
    loss_fn: Callable, params, batch, num_microbatches: int, *, has_aux: bool = True
) -> tuple[jax.Array, Any, Any]:
    """Mean loss, aux and gradients over `num_microbatches` slices of `batch`, one at a time.

    `loss_fn(params, microbatch)` returns `(loss, aux)` (or `loss` with `has_aux=False`).
    Every leaf of `batch` is split along its leading axis; microbatch k holds rows
    k, k + n, k + 2n, ... (a strided split keeps each device's rows on that device when the
    batch is sharded over its leading axis). A `lax.scan` sums loss, aux and gradients (in
    float32 or wider) and divides by n, so when `loss_fn` is a mean over its rows the result
    equals `jax.value_and_grad(loss_fn)(params, batch)` with peak activation memory of one
    microbatch. Aux leaves are averaged too (integer leaves come back as floats).

    Returns `(loss, aux, grads)`; `aux` is None when `has_aux=False`.
    """
    check_positive(num_microbatches, "num_microbatches")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def loss_aux_grads(microbatch):
        if has_aux:
            (loss, aux), grads = grad_fn(params, microbatch)
            return loss, aux, grads
        loss, grads = grad_fn(params, microbatch)
        return loss, None, grads

    if num_microbatches == 1:
        return loss_aux_grads(batch)
    for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] % num_microbatches:
            raise ValueError(
                f"`batch` leaf {jax.tree_util.keystr(path)} with shape {jnp.shape(leaf)} cannot be "
                f"split into {num_microbatches} equal microbatches along its leading axis"
            )

    def split(x):
        x = jnp.asarray(x)
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)  # [n, B / n, ...]

    microbatches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], microbatches)
    out_shapes = jax.eval_shape(loss_aux_grads, first)
    sum_dtype = lambda s: jnp.promote_types(s.dtype, jnp.float32)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, sum_dtype(s)), out_shapes)

    def add_microbatch(total, microbatch):
        out = loss_aux_grads(microbatch)
        return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, out), None

    total, _ = jax.lax.scan(add_microbatch, zeros, microbatches)
    loss, aux, grads = total
    mean = lambda x: x / num_microbatches
    grads = jax.tree.map(lambda g, s: mean(g).astype(s.dtype), grads, out_shapes[2])
    return mean(loss).astype(out_shapes[0].dtype), jax.tree.map(mean, aux), grads


__all__ = [
    "OptimizerConfig", "make_schedule", "decay_mask", "make_optimizer", "optimizer_metrics",
    "check_finite", "accumulate_gradients", "SCHEDULES", "NONFINITE_POLICIES",
]
