"""Reducing a per-token loss `[batch, time]` to a scalar.

How token losses are averaged is a real algorithmic choice in RLHF: it decides how much a
long response weighs against a short one and whether the gradient scale depends on the
microbatch split. Every policy-gradient loss here takes `aggregation=` and forwards it to
`aggregate`.

| mode | formula | known as |
|---|---|---|
| `token_mean` (`bnpo`) | `sum_bt(x*m) / sum_bt(m)` | PPO in most LM libraries; BNPO |
| `sequence_mean` (`grpo`) | `mean_b( sum_t(x*m) / sum_t(m) )` | GRPO (Shao et al., 2024, arXiv:2402.03300) |
| `sequence_sum` | `mean_b( sum_t(x*m) )` | REINFORCE on sequence log-probs |
| `dr_grpo` | `sum_bt(x*m) / (B * max_len)` | Dr. GRPO (Liu et al., 2025, arXiv:2503.20783) |
| `dapo` | `sum_bt(x*m) / N_global` | DAPO (Yu et al., 2025, arXiv:2503.14476) |

`N_global` is the number of counted tokens in the whole global batch (all devices and all
gradient-accumulation microbatches), so that summing the microbatch losses gives a true
token-level mean; it defaults to the local count, which makes `dapo` equal `token_mean`.
`sequence_mean` and `sequence_sum` average over all `B` rows: a row with no counted token
contributes 0 and still counts in `B`.
"""
from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.ops.checks import check_in, check_positive, check_rank, check_same_shape

AGGREGATION_MODES = (
    "token_mean",
    "bnpo",
    "sequence_mean",
    "grpo",
    "sequence_sum",
    "dr_grpo",
    "dapo",
)

_ALIASES = {"bnpo": "token_mean", "grpo": "sequence_mean"}


def check_aggregation(mode: str, name: str = "aggregation") -> None:
    """Raise ValueError unless `mode` is one of `AGGREGATION_MODES`."""
    check_in(mode, AGGREGATION_MODES, name)


def aggregate(
    per_token,
    mask,
    mode: str = "token_mean",
    *,
    max_len: int | None = None,
    global_token_count=None,
):
    """Reduce a masked `[batch, time]` per-token quantity to a float32 scalar.

    Args:
      per_token: `[B, T]` values (e.g. a per-token loss).
      mask: `[B, T]`, 1 on counted tokens and 0 on padding (bool or float). Values at
        masked positions are ignored, even if they are NaN or infinite.
      mode: one of `AGGREGATION_MODES` (see the module docstring for each formula).
      max_len: the `dr_grpo` normaliser (the maximum response length of the run, a static
        positive int); defaults to `T`. Ignored by the other modes.
      global_token_count: the `dapo` normaliser, the number of counted tokens in the whole
        global batch (a Python number or a traced scalar, e.g. from `jax.lax.psum`);
        defaults to the local count. Ignored by the other modes. Guarded to be >= 1.

    Returns:
      A float32 scalar.
    """
    check_rank(per_token, 2, "per_token")
    check_same_shape(per_token=per_token, mask=mask)
    check_aggregation(mode, "mode")
    if max_len is not None:
        check_positive(max_len, "max_len")
    if global_token_count is not None:
        check_rank(global_token_count, 0, "global_token_count")
    mode = _ALIASES.get(mode, mode)

    batch, time = per_token.shape
    weights = mask.astype(jnp.float32)
    counted = jnp.where(weights != 0, per_token.astype(jnp.float32) * weights, 0.0)

    if mode == "token_mean":
        return jnp.sum(counted) / jnp.maximum(jnp.sum(weights), 1.0)
    if mode == "sequence_mean":
        per_sequence = jnp.sum(counted, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return jnp.mean(per_sequence)
    if mode == "sequence_sum":
        return jnp.mean(jnp.sum(counted, axis=1))
    if mode == "dr_grpo":
        length = time if max_len is None else max_len
        return jnp.sum(counted) / (batch * jnp.asarray(length, dtype=jnp.float32))
    # dapo
    if global_token_count is None:
        global_token_count = jnp.sum(weights)
    total = jnp.asarray(global_token_count, dtype=jnp.float32)
    return jnp.sum(counted) / jnp.maximum(total, 1.0)
