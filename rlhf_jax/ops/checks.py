"""Boundary checks for public functions.

Each check runs on static shape/dtype information only, so it is free under `jax.jit`, and
raises `ValueError` naming the offending argument instead of letting a broadcast fail deep in
XLA.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


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


def check_floating(x, name: str) -> None:
    """Raise unless `x` has a floating-point dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"`{name}` must be a floating-point array, got dtype {jnp.result_type(x)}")


def check_positive(value, name: str) -> None:
    """Raise unless a static Python number is > 0 (skipped for traced values)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}")


def check_in(value, allowed: Sequence[str], name: str) -> None:
    """Raise unless a static option is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {sorted(allowed)}, got {value!r}")
