"""Boundary checks for public functions.

Each check runs on static shape/dtype information only, so it is free under `jax.jit`, and
raises `ValueError` naming the offending argument instead of letting a broadcast fail deep in
XLA. The exceptions (`check_token_ids`, `check_left_padded`, `check_prompted_responses`)
read values, and only of concrete (not traced) arrays.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(x, rank: int | Sequence[int], name: str) -> None:
    """Raise if `x.ndim` is not `rank` (or one of `rank`)."""
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    ndim = jnp.ndim(x)
    if ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"`{name}` must have rank {want}, got shape {jnp.shape(x)}")


def check_same_shape(**arrays) -> None:
    """Raise unless every keyword array has the same shape, e.g. `check_same_shape(logp=a, mask=m)`."""
    items = [(name, jnp.shape(x)) for name, x in arrays.items() if x is not None]
    if not items:
        return
    first_name, first_shape = items[0]
    for name, shape in items[1:]:
        if shape != first_shape:
            detail = ", ".join(f"{n}{s}" for n, s in items)
            raise ValueError(
                f"`{name}` has shape {shape} but `{first_name}` has shape {first_shape}; "
                f"these arguments must share one shape ({detail})"
            )


def check_nonempty(x, name: str) -> None:
    """Raise if `x` has no rows (a leading axis of size 0): a mean over them would be NaN."""
    if jnp.ndim(x) and jnp.shape(x)[0] == 0:
        raise ValueError(f"`{name}` is empty (shape {jnp.shape(x)}): the loss needs at least one row; "
                         "skip empty batches before calling it")


def check_floating(x, name: str) -> None:
    """Raise unless `x` has a floating-point dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"`{name}` must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_positive(value, name: str) -> None:
    """Raise unless a static Python number is > 0 (skipped for traced values)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


def check_finite_score(value, name: str) -> None:
    """A ValueError naming `name` unless `value` is None or a finite number (a score setting
    such as `missing_eos_score`: NaN or inf would make every update non-finite)."""
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value)):
        raise ValueError(f"`{name}` must be a finite number or None, got {value!r}")


def check_in(value, allowed: Sequence[str], name: str) -> None:
    """Raise unless a static option is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {value!r}")


def _is_concrete(*arrays) -> bool:
    """Whether every array's values can be read here (not traced, not spread over processes)."""
    return not any(isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and not x.is_fully_addressable)
                   for x in arrays)


def check_token_ids(ids, mask, name: str, vocab_size: int | None = None, *, from_position: int = 0) -> None:
    """Raise unless every real token of `ids` (where `mask` != 0, at time positions
    `>= from_position` of the last axis) is in `[0, vocab_size)` (`>= 0` without
    `vocab_size`), naming the first bad position. Ids where `mask` is 0 are
    not checked (callers ignore them, e.g. an ignore index of -100). Skipped for traced
    values (under `jax.jit` an out-of-range id cannot raise, and its embedding or log-prob
    comes out NaN) and for arrays spread over several processes."""
    if not _is_concrete(ids, mask):
        return
    ids, real = np.asarray(ids), np.asarray(mask) != 0
    real[..., :from_position] = False
    bad = real & ((ids < 0) | (ids >= vocab_size if vocab_size is not None else False))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise ValueError(
            f"`{name}` holds token id {int(ids[where])} at index {list(where)}, a real position "
            f"(mask 1); ids there must be {bound}. Mark ignored tokens (e.g. -100) with mask 0: "
            f"ids at masked positions are never read")


def check_left_padded(mask, name: str = "prompt_mask") -> None:
    """Raise unless every row of `mask` [..., P] is left-padded: zeros, then ones up to the
    last column (`0 0 1 1 1`). Rows of only zeros (batch padding) pass. Names the first bad
    row and the fix. Skipped for traced values and arrays spread over several processes."""
    if not _is_concrete(mask):
        return
    real = np.asarray(mask) != 0
    if real.ndim == 0 or real.shape[-1] == 0:
        return
    drops = real[..., :-1] & ~real[..., 1:]  # a real token followed by padding
    rows = drops.any(axis=-1)
    if not rows.any():
        return
    row = tuple(int(i) for i in np.argwhere(rows)[0])
    column = int(np.argmax(drops[row])) + 1
    where = "ends in padding (last column 0)" if not real[row][column:].any() else (
        f"has padding at column {column} between real tokens")
    index = row[0] if len(row) == 1 else list(row)
    raise ValueError(
        f"`{name}` row {index} {where}: prompts must be LEFT-padded, each row's real tokens "
        f"ending in its last column (rows of only zeros, batch padding, are allowed). A Hugging "
        f"Face tokenizer pads on the right by default: set `tokenizer.padding_side = \"left\"` "
        f"(or pass `padding_side=\"left\"` when calling it); `rlhf_jax.pipeline.data` pads prompts "
        f"on the left already")


def check_prompted_responses(prompt_mask, response_mask) -> None:
    """Raise if a row whose `prompt_mask` [B, P] is all 0 has a real token in `response_mask`
    [B, ...]: its first response token would be scored from padding. Skipped like
    `check_left_padded`."""
    if not _is_concrete(prompt_mask, response_mask):
        return
    empty = ~(np.asarray(prompt_mask) != 0).any(axis=-1)  # [B]
    responses = np.asarray(response_mask) != 0
    answered = responses.any(axis=tuple(range(1, responses.ndim)))  # [B]
    if (empty & answered).any():
        row = int(np.argmax(empty & answered))
        raise ValueError(
            f"`prompt_mask` row {row} is all 0 but `response_mask` marks real tokens in that row: "
            "every prompt needs at least one real token in its last column (a prompt with no text "
            "puts its first token there, e.g. BOS); only rows of batch padding, with no real "
            "response tokens, may have an empty prompt")
